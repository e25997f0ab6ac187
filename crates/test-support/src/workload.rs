//! A well-behaved driver workload that runs while a test does something
//! hostile to the same proxy, and reports every error it saw.

use mongodb::Client;

/// A well-behaved Rust driver workload (insert, find by _id, update,
/// count) looping on `workers` tasks until stopped; every error is kept.
pub struct Workload {
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<(u64, Vec<String>)>>,
}

/// What a workload did.
#[derive(Debug)]
pub struct WorkloadResult {
    pub operations: u64,
    pub errors: Vec<String>,
}

impl Workload {
    pub fn start(client: &Client, database: &str, workers: usize) -> Workload {
        let stop = tokio_util::sync::CancellationToken::new();
        let tasks = (0..workers)
            .map(|worker| {
                let items = client
                    .database(database)
                    .collection::<bson::Document>("items");
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut operations = 0u64;
                    let mut errors = Vec::new();
                    let mut n = 0i64;
                    while !stop.is_cancelled() {
                        let id = format!("w{worker}-{n}");
                        n += 1;
                        let result: Result<(), String> = async {
                            let failed = |op: &str| {
                                let op = op.to_string();
                                move |e: mongodb::error::Error| format!("{op}: {e}")
                            };
                            items
                                .insert_one(bson::doc! { "_id": &id, "n": n })
                                .await
                                .map_err(failed("insert"))?;
                            let found = items
                                .find_one(bson::doc! { "_id": &id })
                                .await
                                .map_err(failed("find"))?;
                            if found.is_none() {
                                return Err(format!("{id} not found after its insert"));
                            }
                            items
                                .update_one(
                                    bson::doc! { "_id": &id },
                                    bson::doc! { "$inc": { "n": 1 } },
                                )
                                .await
                                .map_err(failed("update"))?;
                            items
                                .count_documents(bson::doc! { "_id": &id })
                                .await
                                .map(|_| ())
                                .map_err(failed("count"))
                        }
                        .await;
                        match result {
                            Ok(()) => operations += 4,
                            Err(e) => errors.push(e),
                        }
                    }
                    (operations, errors)
                })
            })
            .collect();
        Workload { stop, tasks }
    }

    pub async fn stop(self) -> WorkloadResult {
        self.stop.cancel();
        let mut result = WorkloadResult {
            operations: 0,
            errors: Vec::new(),
        };
        for task in self.tasks {
            let (operations, errors) = task.await.expect("workload task");
            result.operations += operations;
            result.errors.extend(errors);
        }
        result
    }
}
