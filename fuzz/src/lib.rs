//! What each fuzz target checks, shared by the targets (each a one-line
//! `fuzz_target!`), plus the counting global allocator the OP_COMPRESSED
//! target uses to prove that a decompression bomb is refused before it
//! costs more memory than the message size limit allows. Only this crate
//! uses `unsafe` (the `GlobalAlloc` impl); sessionguard itself forbids it.
//!
//! The targets must never panic on any input; beyond that each checks the
//! invariants its parser promises (see the functions below).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bson::RawDocument;
use bytes::BytesMut;
use sessionguard_protocol::command::{auth_user, Handshake, ReplyView, RequestView};
use sessionguard_protocol::wire::{self, op_compressed, FrameCodec, Message, OpCode, OpMsg, HEADER_LEN};

/// The message size limit the targets run with: small enough that a bomb
/// built from a few KiB of fuzz input exceeds it many times over.
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;

/// What decompressing one message may allocate at its peak: the output
/// buffer (at most the limit), the decoder's window (zstd's is capped at
/// the next power of two of the limit; zlib's is 32 KiB) and decoder state.
pub const DECOMPRESS_ALLOWANCE: usize = 2 * MAX_MESSAGE_SIZE + 512 * 1024;

// ------------------------------------------------------------ allocator

/// Counts live heap bytes and their high-water mark.
pub struct CountingAllocator;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters are plain atomics and never affect the returned memory.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        new
    }
}

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Runs `f` and returns its result with the most heap it held at once
/// beyond what was live when it started. (libFuzzer runs inputs on one
/// thread, so nothing else allocates meanwhile.)
pub fn peak_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let start = LIVE.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    let result = f();
    let peak = PEAK.load(Ordering::Relaxed);
    (result, peak.saturating_sub(start))
}

// ------------------------------------------------------------ targets

/// Raw bytes from a peer, arriving in chunks: the decoder must yield the
/// same frames whatever the chunking, each exactly `messageLength` bytes,
/// none over the limit, in order and covering a prefix of the input; every
/// frame then goes through opening, parsing and the command view.
pub fn decode_frames(data: &[u8]) {
    let Some((&chunk_seed, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk_seed % 64) + 1;

    let whole = decode_all(stream, stream.len());
    let chunked = decode_all(stream, chunk);
    assert_eq!(whole.frames, chunked.frames, "chunking changed the frames");
    assert_eq!(whole.failed, chunked.failed, "chunking changed the outcome");

    let mut offset = 0;
    for frame in &whole.frames {
        let declared = usize::try_from(frame.header.message_length).expect("positive length");
        assert_eq!(frame.bytes.len(), declared);
        assert!(declared >= HEADER_LEN && declared <= MAX_MESSAGE_SIZE);
        assert_eq!(&stream[offset..offset + declared], &frame.bytes[..]);
        offset += declared;
        inspect_frame(frame);
    }
}

struct Decoded {
    frames: Vec<wire::Frame>,
    failed: bool,
}

fn decode_all(stream: &[u8], chunk: usize) -> Decoded {
    let mut codec = FrameCodec::new(MAX_MESSAGE_SIZE);
    let mut buffer = BytesMut::new();
    let mut frames = Vec::new();
    for piece in stream.chunks(chunk.max(1)) {
        buffer.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buffer) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                // A decode error closes the connection: nothing after it counts.
                Err(_) => {
                    return Decoded {
                        frames,
                        failed: true,
                    }
                }
            }
        }
    }
    Decoded {
        frames,
        failed: false,
    }
}

/// Opens (decompressing if needed) and parses one frame, and reads every
/// part of it the session engine would.
fn inspect_frame(frame: &wire::Frame) {
    let Ok(opened) = wire::open(frame, MAX_MESSAGE_SIZE) else {
        return;
    };
    assert!(opened.body.len() <= MAX_MESSAGE_SIZE);
    if let Ok(message) = opened.parse(frame) {
        inspect_message(&message);
    }
}

fn inspect_message(message: &Message<'_>) {
    if let Some(view) = RequestView::from_message(message) {
        touch_request(&view);
    }
    if let Some(reply) = ReplyView::from_message(message) {
        touch_reply(&reply);
    }
}

/// An OP_MSG body (after a 16-byte header taken from the input when it is
/// long enough): unknown required flags refused, exactly one kind-0
/// section, every kind-1 section filled exactly by well-framed documents,
/// the checksum verified when present.
pub fn op_msg_sections(data: &[u8]) {
    let (header, body) = if data.len() >= HEADER_LEN {
        data.split_at(HEADER_LEN)
    } else {
        (&[0u8; HEADER_LEN][..], data)
    };
    let Ok(msg) = OpMsg::parse(header, body) else {
        return;
    };
    assert_eq!(
        msg.flags.0 & 0xFFFF & !0b11,
        0,
        "unknown required flag accepted"
    );
    assert_eq!(msg.checksum.is_some(), msg.flags.checksum_present());
    for sequence in &msg.sequences {
        let framed: usize = sequence.iter().map(|doc| doc.as_bytes().len()).sum();
        assert_eq!(
            framed,
            sequence.documents.len(),
            "a sequence has stray bytes"
        );
    }
    let _ = msg.command_name();
    inspect_message(&Message::Msg(msg));
}

/// An OP_COMPRESSED body: never more than `DECOMPRESS_ALLOWANCE` bytes of
/// heap at once, whatever the payload claims or expands to; a success
/// yields exactly the declared size, within the limit.
pub fn op_compressed(data: &[u8]) {
    let (result, peak) = peak_allocation(|| op_compressed::decompress(data, MAX_MESSAGE_SIZE));
    assert!(
        peak <= DECOMPRESS_ALLOWANCE,
        "decompressing a {}-byte message allocated {peak} bytes at its peak (allowed {DECOMPRESS_ALLOWANCE})",
        data.len()
    );
    if let Ok((op_code, _, out)) = result {
        let declared = i32::from_le_bytes(data[4..8].try_into().expect("4 bytes"));
        assert_eq!(Ok(out.len()), usize::try_from(declared));
        assert!(out.len() <= MAX_MESSAGE_SIZE - HEADER_LEN);
        if let Ok(message) = wire::parse(op_code, &[0u8; HEADER_LEN], &out) {
            inspect_message(&message);
        }
    }
}

/// The command view over arbitrary documents: the first byte picks how the
/// rest is presented (an OP_MSG body, a BSON document as an OP_MSG command,
/// an OP_QUERY body, a reply document). Every accessor must cope with any
/// element types, missing fields and garbage inside a well-framed document.
pub fn command_view(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => {
            if let Ok(message) = wire::parse(OpCode::Msg, &[0u8; HEADER_LEN], rest) {
                inspect_message(&message);
            }
        }
        1 => {
            let Ok(doc) = RawDocument::from_bytes(rest) else {
                return;
            };
            let mut body = vec![0u8; 4];
            body.push(0);
            body.extend_from_slice(doc.as_bytes());
            if let Ok(message) = wire::parse(OpCode::Msg, &[0u8; HEADER_LEN], &body) {
                inspect_message(&message);
            }
        }
        2 => {
            if let Ok(message) = wire::parse(OpCode::Query, &[0u8; HEADER_LEN], rest) {
                inspect_message(&message);
            }
        }
        _ => {
            if let Ok(doc) = RawDocument::from_bytes(rest) {
                touch_reply(&ReplyView::from_document(doc, false));
            }
        }
    }
}

fn touch_request(view: &RequestView<'_>) {
    let _ = (view.name, view.db, view.txn_number, view.autocommit);
    let _ = view.collection();
    let _ = view.namespace().to_string();
    let _ = (view.in_transaction(), view.is_retryable_write());
    let _ = view.get_more_cursor_id();
    let _ = view.killed_cursor_ids().count();
    let _ = view.session_list().count();
    let _ = view.kill_patterns();
    let _ = view.statement_hash();
    // The session store reads every write's statements (sequence or body
    // array) and the body itself on each request.
    let _ = view.body();
    for field in ["documents", "updates", "deletes"] {
        let _ = view.statements(field).count();
    }
    if let Some(lsid) = view.lsid {
        let _ = (lsid.to_string(), lsid.short().to_string());
    }
    let _ = Handshake::from_request(view);
    let _ = auth_user(view);
    let _ = sessionguard_protocol::command::is_hello(view.name);
}

fn touch_reply(reply: &ReplyView<'_>) {
    let _ = (reply.ok, reply.code, reply.code_name, reply.cursor_id);
    let _ = reply.error_labels().count();
    let _ = reply.write_error_codes().count();
    let _ = reply.has_label("TransientTransactionError");
    let _ = reply.is_clean_success();
    let _ = (
        reply.integer("n"),
        reply.boolean("ok"),
        reply.subdocument("cursor"),
    );
    let _ = reply.document();
}
