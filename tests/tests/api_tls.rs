//! The API over TLS, as a client sees it: the `verse` CLI trusts versed's certificate through
//! a CA file (or a pinned fingerprint) and is refused with any other CA, the system's roots
//! included; a plain HTTP request to the TLS listener is refused; the self-signed certificate
//! generated at first start is kept across restarts and its fingerprint is logged; a
//! certificate and key given as files are served.
use std::path::Path;

use tests::*;

/// `verse` against `host` over https as its admin, with `tls_args` (`--ca-file`,
/// `--fingerprint`).
fn cli(host: &Host, tls_args: &[&str], args: &[&str]) -> std::process::Output {
    let url = host.api.url().replace("http://", "https://");
    cli_at(host, &url, tls_args, args)
}

/// `verse --api url` against `host` as its admin.
fn cli_at(host: &Host, url: &str, tls_args: &[&str], args: &[&str]) -> std::process::Output {
    let token = host.api.token().expect("the admin token");
    let mut all = vec!["--api", url, "--token", token];
    all.extend_from_slice(tls_args);
    all.extend_from_slice(args);
    verse_cli(host.netns().name(), &all)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A CA and a leaf certificate it signed for `names`, as PEM files in `dir`: (ca, cert, key).
fn ca_and_leaf(dir: &Path, tag: &str, names: &[&str]) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, format!("test CA {tag}"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths: Vec<String> = ["ca.pem", "cert.pem", "key.pem"]
        .iter()
        .map(|f| dir.join(format!("{tag}-{f}")).to_string_lossy().into_owned())
        .collect();
    std::fs::write(&paths[0], ca_cert.pem()).unwrap();
    std::fs::write(&paths[1], cert.pem()).unwrap();
    std::fs::write(&paths[2], key.serialize_pem()).unwrap();
    (paths[0].clone(), paths[1].clone(), paths[2].clone())
}

/// `openssl x509 -fingerprint -sha256`'s form of a PEM certificate's fingerprint, computed by
/// the test from the file.
fn fingerprint_of(pem_path: &Path) -> String {
    let der = verse::tls::read_certs(pem_path).expect("a PEM certificate");
    verse::tls::fingerprint(&der[0])
}

#[test]
fn the_self_signed_certificate_is_trusted_through_its_file_or_fingerprint_and_nothing_else() {
    let mut host = Host::start_with_config(Some("[api]\ntls = \"on\"\n"));
    let cert = host.state_dir().join("tls/api.crt");
    assert!(cert.is_file(), "versed generates its certificate at first start");
    let fingerprint = fingerprint_of(&cert);
    assert!(
        host.versed.log().contains(&fingerprint),
        "the log names the certificate's fingerprint {fingerprint}:\n{}",
        host.versed.log()
    );
    let cert_s = cert.to_string_lossy().into_owned();

    // The right CA file: the CLI works.
    let out = cli(
        &host,
        &["--ca-file", &cert_s],
        &["universe", "create", "blue", "--cidr", "10.1.0.0/16"],
    );
    assert!(out.status.success(), "verse with versed's certificate as CA: {}", stderr(&out));
    let out = cli(&host, &["--ca-file", &cert_s, "-o", "json"], &["universe", "list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"blue\""));

    // A wrong CA: refused, saying why; nothing created.
    let other = TempDir::new("ca");
    let (wrong_ca, _, _) = ca_and_leaf(other.path(), "other", &["127.0.0.1"]);
    let out = cli(
        &host,
        &["--ca-file", &wrong_ca],
        &["universe", "create", "red", "--cidr", "10.2.0.0/16"],
    );
    assert_eq!(out.status.code(), Some(1), "a wrong CA must be refused: {}", stderr(&out));
    assert!(stderr(&out).contains("certificate"), "the error says why: {}", stderr(&out));
    // The system's roots do not know a self-signed certificate either.
    let out = cli(&host, &[], &["universe", "list"]);
    assert_eq!(out.status.code(), Some(1), "system roots must refuse it: {}", stderr(&out));

    // Pinning: the logged fingerprint works, any other is refused.
    let out = cli(&host, &["--fingerprint", &fingerprint], &["universe", "list"]);
    assert!(out.status.success(), "the pinned fingerprint: {}", stderr(&out));
    let wrong = fingerprint_of(Path::new(&wrong_ca));
    let out = cli(&host, &["--fingerprint", &wrong], &["universe", "list"]);
    assert_eq!(out.status.code(), Some(1), "a wrong pin must be refused: {}", stderr(&out));
    assert!(stderr(&out).contains("fingerprint"), "{}", stderr(&out));

    // Plain HTTP to the TLS listener is refused (and served nothing).
    let r = host.api.get("/v1/universes");
    assert_eq!(r.status, 400, "plain HTTP on the TLS port: {}", r.body);
    assert_eq!(r.error_code(), "tls_required");
    assert!(!r.body.contains("blue"));
    let out = cli_at(&host, &host.api.url(), &[], &["universe", "list"]);
    assert_eq!(out.status.code(), Some(1), "the CLI over http:// is refused: {}", stderr(&out));

    // The same pair after a restart, so clients keep trusting it.
    host.versed.restart();
    assert_eq!(fingerprint_of(&cert), fingerprint, "the certificate is kept across restarts");
    let out = cli(&host, &["--ca-file", &cert_s], &["universe", "list"]);
    assert!(out.status.success(), "after a restart: {}", stderr(&out));
    let names = std::fs::read_to_string(host.state_dir().join("versed.log")).unwrap();
    assert!(names.matches(&fingerprint).count() >= 2, "logged at every start");
}

#[test]
fn a_certificate_given_as_files_is_served_and_verified_through_its_ca() {
    let dir = TempDir::new("c");
    let (ca, cert, key) = ca_and_leaf(dir.path(), "api", &["localhost"]);
    let config = format!("[api]\ntls_cert_file = \"{cert}\"\ntls_key_file = \"{key}\"\n");
    // On loopback with a certificate given, "auto" serves TLS.
    let host = Host::start_with_config(Some(&config));
    assert!(
        !host.state_dir().join("tls/api.crt").exists(),
        "no self-signed pair is made when one is given"
    );
    assert!(host.versed.log().contains(&fingerprint_of(Path::new(&cert))));
    let by_name = host.api.url().replace("http://127.0.0.1", "https://localhost");
    let out = cli_at(
        &host,
        &by_name,
        &["--ca-file", &ca],
        &["universe", "create", "blue", "--cidr", "10.1.0.0/16"],
    );
    assert!(out.status.success(), "the CA of the given certificate: {}", stderr(&out));
    // The CA of another pair is refused.
    let (other_ca, _, _) = ca_and_leaf(dir.path(), "other", &["localhost"]);
    let out = cli_at(&host, &by_name, &["--ca-file", &other_ca], &["universe", "list"]);
    assert_eq!(out.status.code(), Some(1), "another CA is refused: {}", stderr(&out));
    // A name the certificate does not carry (127.0.0.1) is refused, even with the right CA.
    let out = cli(&host, &["--ca-file", &ca], &["universe", "list"]);
    assert_eq!(out.status.code(), Some(1), "a name not in the certificate: {}", stderr(&out));
}

#[test]
fn plain_http_on_an_address_that_is_not_loopback_needs_insecure_http() {
    // Started by hand: the harness listens on loopback. The settings are refused before
    // anything is bound or loaded.
    let ns = Netns::new("p");
    let state = TempDir::new("s");
    let config = "[api]\ntls = \"off\"\n";
    std::fs::write(state.path().join("versed.toml"), config).unwrap();
    let bin = std::env::var_os("VERSE_BIN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
        .join("versed");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(&bin)
        .arg("--state-dir")
        .arg(state.path())
        .arg("--config")
        .arg(state.path().join("versed.toml"))
        .args(["--listen", "198.18.7.1:7070", "--host", "p"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "plain HTTP on 198.18.7.1 must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("insecure_http") && err.contains("198.18.7.1"), "{err}");
}
