//! Upstream certificate verification that accepts what the drivers accept
//! as `tlsCAFile`: rustls' `WebPkiServerVerifier`, plus the one case webpki
//! refuses and OpenSSL (PyMongo, the Node.js driver) accepts — a
//! server certificate that is byte for byte one of the certificates in
//! `tlsCAFile` although it is a CA certificate (basicConstraints CA:TRUE).
//! That is what `openssl req -x509 -newkey ... -subj /CN=db1` makes by
//! default, and webpki rejects it with `CaUsedAsEndEntity`.
//!
//! Such a certificate is trusted as itself, the way OpenSSL trusts a
//! self-signed certificate found in its trust store (the chain is the trust
//! anchor alone, whose own signature OpenSSL does not check): the operator
//! put exactly these bytes in the trust file. It must still be valid now
//! (notBefore/notAfter), be usable to authenticate a TLS server (an
//! extendedKeyUsage, if present, lists serverAuth; a keyUsage, if present,
//! allows digitalSignature, keyEncipherment or keyAgreement: OpenSSL's
//! `ssl_server` purpose), and name the host the proxy dialed in its
//! subjectAltName (webpki's name check; the subject CN is not used). The
//! handshake signatures are verified against its key as for any
//! certificate, so the server must hold its private key. Every other
//! outcome of webpki — including `CaUsedAsEndEntity` for a certificate that
//! is not in the trust file — stands unchanged.
//!
//! With `tlsAllowInvalidHostnames=true` the same verifier forgives a name
//! mismatch (and only that): the chain must still lead to a trusted
//! certificate.
//!
//! The small DER reader below only ever reads certificates from the
//! operator's own `tlsCAFile`, at load time; it never parses what a server
//! sends (a server certificate is only compared byte for byte).

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// `WebPkiServerVerifier`, accepting a trusted self-signed CA certificate
/// as the server's own certificate (see the module doc).
#[derive(Debug)]
pub(super) struct WebPkiOrAnchorLeaf {
    webpki: Arc<WebPkiServerVerifier>,
    anchors: Vec<AnchorLeaf>,
    /// `tlsAllowInvalidHostnames=true`: a name mismatch is forgiven.
    ignore_hostname: bool,
}

impl WebPkiOrAnchorLeaf {
    /// `trusted`: the certificates of `tlsCAFile` (those that cannot be
    /// read here are simply never accepted as leaves).
    pub(super) fn new(
        webpki: Arc<WebPkiServerVerifier>,
        trusted: &[CertificateDer<'static>],
        ignore_hostname: bool,
    ) -> WebPkiOrAnchorLeaf {
        let anchors = trusted.iter().filter_map(AnchorLeaf::read).collect();
        WebPkiOrAnchorLeaf {
            webpki,
            anchors,
            ignore_hostname,
        }
    }
}

/// True for webpki's refusal of a CA certificate as a server certificate.
pub(crate) fn is_ca_used_as_end_entity(error: &rustls::Error) -> bool {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => matches!(
            other.0.downcast_ref::<webpki::Error>(),
            Some(webpki::Error::CaUsedAsEndEntity)
        ),
        _ => false,
    }
}

impl ServerCertVerifier for WebPkiOrAnchorLeaf {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(e) if is_ca_used_as_end_entity(&e) => {
                match self
                    .anchors
                    .iter()
                    .find(|anchor| anchor.der.as_ref() == end_entity.as_ref())
                {
                    Some(anchor) => anchor.verify(server_name, now),
                    None => Err(e),
                }
            }
            other => other,
        };
        match verdict {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.ignore_hostname => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// A certificate of `tlsCAFile`, with what checking it as a server
/// certificate needs.
#[derive(Debug)]
struct AnchorLeaf {
    der: CertificateDer<'static>,
    not_before: UnixTime,
    not_after: UnixTime,
    /// extendedKeyUsage and keyUsage allow a TLS server.
    for_servers: bool,
}

impl AnchorLeaf {
    fn read(der: &CertificateDer<'static>) -> Option<AnchorLeaf> {
        let facts = der::read(der.as_ref())?;
        Some(AnchorLeaf {
            der: der.clone(),
            not_before: facts.not_before,
            not_after: facts.not_after,
            for_servers: facts.server_auth_allowed,
        })
    }

    /// The checks webpki would have made of a leaf, in its order.
    fn verify(
        &self,
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if now < self.not_before {
            return Err(CertificateError::NotValidYetContext {
                time: now,
                not_before: self.not_before,
            }
            .into());
        }
        if now > self.not_after {
            return Err(CertificateError::ExpiredContext {
                time: now,
                not_after: self.not_after,
            }
            .into());
        }
        if !self.for_servers {
            return Err(CertificateError::InvalidPurpose.into());
        }
        let cert = webpki::EndEntityCert::try_from(&self.der)
            .map_err(|_| rustls::Error::from(CertificateError::BadEncoding))?;
        match cert.verify_is_valid_for_subject_name(server_name) {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(webpki::Error::CertNotValidForName(context)) => {
                Err(CertificateError::NotValidForNameContext {
                    expected: context.expected,
                    presented: context.presented,
                }
                .into())
            }
            Err(_) => Err(CertificateError::NotValidForName.into()),
        }
    }
}

/// Just enough DER to read a certificate's validity period and usage
/// extensions (RFC 5280 §4.1). Any surprise yields `None`.
mod der {
    use super::*;

    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;
    const OID: u8 = 0x06;
    const BOOLEAN: u8 = 0x01;
    const OCTET_STRING: u8 = 0x04;
    const BIT_STRING: u8 = 0x03;
    const UTC_TIME: u8 = 0x17;
    const GENERALIZED_TIME: u8 = 0x18;
    /// `[0] EXPLICIT Version` and `[3] EXPLICIT Extensions` of TBSCertificate.
    const VERSION: u8 = 0xA0;
    const EXTENSIONS: u8 = 0xA3;
    /// 2.5.29.37 and 2.5.29.15.
    const EXTENDED_KEY_USAGE: &[u8] = &[0x55, 0x1D, 0x25];
    const KEY_USAGE: &[u8] = &[0x55, 0x1D, 0x0F];
    /// id-kp-serverAuth, 1.3.6.1.5.5.7.3.1.
    const SERVER_AUTH: &[u8] = &[0x2B, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
    /// digitalSignature, keyEncipherment, keyAgreement (first byte of the
    /// keyUsage bits, most significant bit first).
    const SERVER_KEY_USAGES: u8 = 0x80 | 0x20 | 0x08;

    pub(super) struct Facts {
        pub not_before: UnixTime,
        pub not_after: UnixTime,
        pub server_auth_allowed: bool,
    }

    pub(super) fn read(der: &[u8]) -> Option<Facts> {
        let mut input = der;
        let mut certificate = expect(&mut input, SEQUENCE)?;
        let mut tbs = expect(&mut certificate, SEQUENCE)?;
        if tbs.first() == Some(&VERSION) {
            take(&mut tbs)?;
        }
        expect(&mut tbs, INTEGER)?; // serialNumber
        expect(&mut tbs, SEQUENCE)?; // signature
        expect(&mut tbs, SEQUENCE)?; // issuer
        let mut validity = expect(&mut tbs, SEQUENCE)?;
        let not_before = time(&mut validity)?;
        let not_after = time(&mut validity)?;
        expect(&mut tbs, SEQUENCE)?; // subject
        expect(&mut tbs, SEQUENCE)?; // subjectPublicKeyInfo
        let mut server_auth_allowed = true;
        // issuerUniqueID [1] and subjectUniqueID [2] may come first.
        while let Some((tag, mut value)) = take(&mut tbs) {
            if tag != EXTENSIONS {
                continue;
            }
            let mut extensions = expect(&mut value, SEQUENCE)?;
            while !extensions.is_empty() {
                let mut extension = expect(&mut extensions, SEQUENCE)?;
                let oid = expect(&mut extension, OID)?;
                if extension.first() == Some(&BOOLEAN) {
                    take(&mut extension)?; // critical
                }
                let mut value = expect(&mut extension, OCTET_STRING)?;
                if oid == EXTENDED_KEY_USAGE {
                    let mut purposes = expect(&mut value, SEQUENCE)?;
                    let mut server = false;
                    while !purposes.is_empty() {
                        server |= expect(&mut purposes, OID)? == SERVER_AUTH;
                    }
                    server_auth_allowed &= server;
                } else if oid == KEY_USAGE {
                    let bits = expect(&mut value, BIT_STRING)?;
                    let first = bits.get(1).copied().unwrap_or(0);
                    server_auth_allowed &= first & SERVER_KEY_USAGES != 0;
                }
            }
        }
        Some(Facts {
            not_before,
            not_after,
            server_auth_allowed,
        })
    }

    /// One element: its tag and contents (definite lengths up to 4 bytes).
    fn take<'a>(input: &mut &'a [u8]) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let count = usize::from(first & 0x7F);
            if count == 0 || count > 4 {
                return None;
            }
            let (bytes, after) = rest.split_at_checked(count)?;
            rest = after;
            bytes
                .iter()
                .fold(0usize, |len, byte| (len << 8) | usize::from(*byte))
        };
        let (value, after) = rest.split_at_checked(len)?;
        *input = after;
        Some((tag, value))
    }

    fn expect<'a>(input: &mut &'a [u8], tag: u8) -> Option<&'a [u8]> {
        let (found, value) = take(input)?;
        (found == tag).then_some(value)
    }

    /// UTCTime `YYMMDDHHMMSSZ` (years 1950-2049) or GeneralizedTime
    /// `YYYYMMDDHHMMSSZ`, the two forms RFC 5280 allows.
    fn time(input: &mut &[u8]) -> Option<UnixTime> {
        let (tag, value) = take(input)?;
        let (year, rest) = match (tag, value.len()) {
            (UTC_TIME, 13) => {
                let yy = digits(&value[..2])?;
                (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &value[2..])
            }
            (GENERALIZED_TIME, 15) => (digits(&value[..4])?, &value[4..]),
            _ => return None,
        };
        if rest.last() != Some(&b'Z') {
            return None;
        }
        let field = |at: usize| digits(&rest[at..at + 2]);
        let (month, day) = (field(0)?, field(2)?);
        let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
            return None;
        }
        let seconds = days_from_civil(year, month, day) * 86_400
            + hour * 3_600
            + minute * 60
            + second.min(60);
        // Before 1970 only happens for notBefore, where the epoch is as good.
        let seconds = u64::try_from(seconds).unwrap_or(0);
        Some(UnixTime::since_unix_epoch(Duration::from_secs(seconds)))
    }

    fn digits(ascii: &[u8]) -> Option<i64> {
        ascii.iter().try_fold(0i64, |n, c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    }

    /// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
    fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
        let year = if month <= 2 { year - 1 } else { year };
        let era = year.div_euclid(400);
        let year_of_era = year - era * 400;
        let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
        let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
        era * 146_097 + day_of_era - 719_468
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn civil_dates_count_days_from_the_epoch() {
            assert_eq!(days_from_civil(1970, 1, 1), 0);
            assert_eq!(days_from_civil(2000, 3, 1), 11_017);
            assert_eq!(days_from_civil(2020, 1, 1) * 86_400, 1_577_836_800);
            assert_eq!(days_from_civil(1969, 12, 31), -1);
        }

        #[test]
        fn truncated_or_odd_input_is_none_never_a_panic() {
            for bad in [
                &[][..],
                &[0x30],
                &[0x30, 0x85, 1, 1, 1, 1, 1],
                &[0x30, 0x05, 0],
            ] {
                assert!(read(bad).is_none(), "{bad:?}");
            }
            let mut odd_time: &[u8] = &[UTC_TIME, 3, b'9', b'9', b'Z'];
            assert!(time(&mut odd_time).is_none());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    use rustls::RootCertStore;

    fn self_signed_ca(
        names: &[&str],
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, names[0]);
        tweak(&mut params);
        params.self_signed(&key).unwrap().der().clone()
    }

    fn verifier(trusted: &[CertificateDer<'static>]) -> WebPkiOrAnchorLeaf {
        let mut roots = RootCertStore::empty();
        for cert in trusted {
            roots.add(cert.clone()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
        WebPkiOrAnchorLeaf::new(webpki, trusted, false)
    }

    fn verify(
        verifier: &WebPkiOrAnchorLeaf,
        leaf: &CertificateDer<'static>,
        name: &str,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(name.to_string()).unwrap();
        verifier.verify_server_cert(leaf, &[], &name, &[], UnixTime::now())
    }

    #[test]
    fn a_trusted_self_signed_ca_certificate_is_accepted_for_its_names_only() {
        let cert = self_signed_ca(&["db1.example", "127.0.0.1"], |_| {});
        let trusting = verifier(std::slice::from_ref(&cert));
        verify(&trusting, &cert, "db1.example").expect("its DNS name");
        verify(&trusting, &cert, "127.0.0.1").expect("its IP address");
        let lenient = WebPkiOrAnchorLeaf {
            ignore_hostname: true,
            ..verifier(std::slice::from_ref(&cert))
        };
        verify(&lenient, &cert, "db2.example").expect("tlsAllowInvalidHostnames");
        let err = verify(&trusting, &cert, "db2.example").unwrap_err();
        assert!(
            matches!(
                &err,
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                    presented, ..
                }) if presented.iter().any(|p| p.contains("db1.example"))
            ),
            "{err:?}"
        );
    }

    #[test]
    fn only_the_exact_bytes_in_the_trust_file_are_trusted_as_themselves() {
        let cert = self_signed_ca(&["db1.example"], |_| {});
        // Same name, another key: not the certificate the operator trusted.
        let impostor = self_signed_ca(&["db1.example"], |_| {});
        let trusting = verifier(std::slice::from_ref(&cert));
        let err = verify(&trusting, &impostor, "db1.example").unwrap_err();
        assert!(is_ca_used_as_end_entity(&err), "{err:?}");
    }

    #[test]
    fn validity_and_server_purpose_are_still_checked() {
        let expired = self_signed_ca(&["db1.example"], |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        });
        let future = self_signed_ca(&["db1.example"], |p| {
            p.not_before = rcgen::date_time_ymd(2070, 1, 1);
            p.not_after = rcgen::date_time_ymd(2071, 1, 1);
        });
        let ca_only = self_signed_ca(&["db1.example"], |p| {
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        });
        let client_only = self_signed_ca(&["db1.example"], |p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        });
        let server = self_signed_ca(&["db1.example"], |p| {
            p.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyCertSign,
            ];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        });
        let refusal = |cert: &CertificateDer<'static>| {
            verify(&verifier(std::slice::from_ref(cert)), cert, "db1.example").err()
        };
        assert!(
            matches!(
                refusal(&expired),
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::ExpiredContext { .. }
                ))
            ),
            "expired"
        );
        assert!(
            matches!(
                refusal(&future),
                Some(rustls::Error::InvalidCertificate(
                    CertificateError::NotValidYetContext { .. }
                ))
            ),
            "not yet valid"
        );
        let wrong_purpose = Some(rustls::Error::InvalidCertificate(
            CertificateError::InvalidPurpose,
        ));
        assert_eq!(refusal(&ca_only), wrong_purpose, "keyUsage for CAs only");
        assert_eq!(refusal(&client_only), wrong_purpose, "clientAuth only");
        assert_eq!(refusal(&server), None, "usages that allow a server");
    }

    #[test]
    fn the_validity_read_here_is_the_one_in_the_certificate() {
        // 2060 is written as GeneralizedTime, 2020 as UTCTime.
        let cert = self_signed_ca(&["db1.example"], |p| {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2060, 6, 30);
        });
        let facts = der::read(cert.as_ref()).expect("readable");
        assert_eq!(facts.not_before.as_secs(), 1_577_836_800);
        assert_eq!(facts.not_after.as_secs(), 2_855_779_200);
        assert!(facts.server_auth_allowed);
    }
}
