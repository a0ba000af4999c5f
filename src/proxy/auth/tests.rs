use super::*;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tokio::io::DuplexStream;

const BINDING: &[u8] = b"certificate hash";

fn app_role() -> Role {
    Role {
        secret: Some(Secret::Scram(Verifier::from_password(
            "pencil",
            b"salt-salt",
            4096,
        ))),
        can_login: true,
        valid_until: None,
    }
}

fn credentials() -> Credentials {
    Credentials::new("SELECT $1".into(), None, Vec::new(), [1; 32], 100_000).unwrap()
}

async fn read_auth(s: &mut DuplexStream) -> (u32, Vec<u8>) {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], b'R');
    let len = u32::from_be_bytes(head[1..5].try_into().unwrap()) as usize;
    let code = u32::from_be_bytes(head[5..9].try_into().unwrap());
    let mut data = vec![0u8; len - 8];
    s.read_exact(&mut data).await.unwrap();
    (code, data)
}

async fn write_p(s: &mut DuplexStream, body: &[u8]) {
    let mut m = vec![b'p'];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    s.write_all(&m).await.unwrap();
}

/// A SCRAM client that picks `mechanism`, sends gs2 `flag`, and puts
/// `cbind_data` after the gs2 header in `c=`.
async fn client(
    mut s: DuplexStream,
    password: &str,
    mechanism: &str,
    flag: &str,
    cbind_data: &[u8],
) -> Vec<u8> {
    let (code, mechs) = read_auth(&mut s).await;
    assert_eq!(code, AUTH_SASL);
    let nonce = "clientnonce";
    let bare = format!("n=,r={nonce}");
    let first = format!("{flag},,{bare}");
    let mut body = mechanism.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(&(first.len() as i32).to_be_bytes());
    body.extend_from_slice(first.as_bytes());
    write_p(&mut s, &body).await;
    let mut rest = Vec::new();
    let mut head = [0u8; 1];
    if s.read_exact(&mut head).await.is_err() || head[0] != b'R' {
        s.read_to_end(&mut rest).await.ok();
        return mechs;
    }
    let mut more = [0u8; 8];
    s.read_exact(&mut more).await.unwrap();
    let len = u32::from_be_bytes(more[..4].try_into().unwrap()) as usize;
    let mut sf = vec![0u8; len - 8];
    s.read_exact(&mut sf).await.unwrap();
    let sf = String::from_utf8(sf).unwrap();
    let parsed = scram::parse_server_first(&sf).unwrap();
    let salted = scram::salted_password(password.as_bytes(), &parsed.salt, parsed.iterations);
    let ck = scram::client_key(&salted);
    let mut c = format!("{flag},,").into_bytes();
    c.extend_from_slice(cbind_data);
    let without = format!("c={},r={}", B64.encode(&c), parsed.nonce);
    let am = scram::auth_message(&bare, &sf, &without);
    let stored = ring::digest::digest(&ring::digest::SHA256, &ck);
    let sig = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, stored.as_ref()),
        am.as_bytes(),
    );
    let proof: Vec<u8> = ck.iter().zip(sig.as_ref()).map(|(a, b)| a ^ b).collect();
    write_p(
        &mut s,
        format!("{without},p={}", B64.encode(proof)).as_bytes(),
    )
    .await;
    // Stay until the server is done with the exchange.
    s.read_to_end(&mut rest).await.ok();
    mechs
}

async fn run(
    password: &str,
    mechanism: &str,
    flag: &str,
    cbind: &[u8],
    offered: Option<&[u8]>,
) -> (Result<Proven, ClientError>, Vec<u8>) {
    let (mut server, c) = tokio::io::duplex(4096);
    let client = tokio::spawn({
        let (password, mechanism, flag, cbind) = (
            password.to_owned(),
            mechanism.to_owned(),
            flag.to_owned(),
            cbind.to_vec(),
        );
        async move { client(c, &password, &mechanism, &flag, &cbind).await }
    });
    let creds = credentials();
    let r = exchange(
        &mut server,
        AuthMethod::ScramSha256,
        "app",
        Ok(Some(app_role())),
        &creds,
        offered.is_some(),
        offered,
    )
    .await;
    drop(server);
    let mechs = client.await.expect("the test client does not panic");
    (r, mechs)
}

#[tokio::test]
async fn scram_without_binding() {
    let (r, mechs) = run("pencil", "SCRAM-SHA-256", "n", b"", None).await;
    assert_eq!(mechs, b"SCRAM-SHA-256\0\0");
    let p = r.unwrap();
    assert!(p.client_key.is_some() && p.password.is_none());
    let (r, _) = run("pen", "SCRAM-SHA-256", "n", b"", None).await;
    assert!(matches!(r, Err(ClientError::AuthFailed(_))));
}

#[tokio::test]
async fn channel_binding_is_checked() {
    let (r, mechs) = run(
        "pencil",
        "SCRAM-SHA-256-PLUS",
        "p=tls-server-end-point",
        BINDING,
        Some(BINDING),
    )
    .await;
    assert_eq!(mechs, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
    assert!(r.is_ok());
    // Bound to some other certificate (a man in the middle): refused.
    let (r, _) = run(
        "pencil",
        "SCRAM-SHA-256-PLUS",
        "p=tls-server-end-point",
        b"another certificate",
        Some(BINDING),
    )
    .await;
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("channel binding check failed"));
    // `y` while PLUS was offered: a downgrade.
    let (r, _) = run("pencil", "SCRAM-SHA-256", "y", b"", Some(BINDING)).await;
    assert!(r.unwrap_err().to_string().contains("negotiation error"));
    // `y` without TLS is fine, `p` without PLUS is not.
    let (r, _) = run("pencil", "SCRAM-SHA-256", "y", b"", None).await;
    assert!(r.is_ok());
    let (r, _) = run(
        "pencil",
        "SCRAM-SHA-256",
        "p=tls-server-end-point",
        b"",
        None,
    )
    .await;
    assert!(r.is_err());
    let (r, _) = run(
        "pencil",
        "SCRAM-SHA-256-PLUS",
        "p=tls-server-end-point",
        b"",
        None,
    )
    .await;
    assert!(r.unwrap_err().to_string().contains("invalid SASL"));
}

#[test]
fn sasl_initial_layout() {
    let mut body = b"SCRAM-SHA-256\0".to_vec();
    body.extend_from_slice(&5i32.to_be_bytes());
    body.extend_from_slice(b"n,,ab");
    assert_eq!(
        parse_sasl_initial(&body),
        Some(("SCRAM-SHA-256", &b"n,,ab"[..]))
    );
    body.push(b'x');
    assert_eq!(parse_sasl_initial(&body), None);
    let mut neg = b"SCRAM-SHA-256\0".to_vec();
    neg.extend_from_slice(&(-1i32).to_be_bytes());
    assert_eq!(parse_sasl_initial(&neg), None);
    for i in 0..body.len() {
        let _ = parse_sasl_initial(&body[..i]);
    }
}
