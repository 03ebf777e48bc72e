//! Traffic capture for real: two network namespaces made here, joined by a veth pair. In
//! `pod`, an app on `0.0.0.0:9090` and `keygate dev` (token server and sidecar, forwarding to
//! `127.0.0.1:9090`); in `client`, curl. Before `keygate capture` the app's port answers
//! anyone; after it, the same request gets the sidecar's 401, a token gets through, and the
//! sidecar still reaches the app on loopback.
//!
//! Needs root, `ip` (iproute2), `nft` (nftables), `curl` and `python3`; it runs when
//! `KEYGATE_NETNS=1`, which `scripts/test.sh` sets where it has them (CI installs them).

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const APP_PORT: u16 = 9090;
const SIDECAR_PORT: u16 = 8100;
const TOKEN_PORT: u16 = 8400;
const RESOURCE: &str = "https://orders.shop.svc";
/// A failure bound for conditions awaited below, not a timing.
const WAIT: Duration = Duration::from_secs(60);

fn keygate() -> &'static str {
    env!("CARGO_BIN_EXE_keygate")
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

fn must(program: &str, args: &[&str]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace, deleted (with its processes' sockets and its end of the veth) on drop.
struct Netns {
    name: String,
    children: Vec<Child>,
}

impl Netns {
    fn new(name: String) -> Self {
        let _ = run("ip", &["netns", "del", &name]);
        must("ip", &["netns", "add", &name]);
        let ns = Self {
            name,
            children: Vec::new(),
        };
        ns.must(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn exec_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["netns", "exec", self.name.as_str()];
        all.extend_from_slice(args);
        all
    }

    fn must(&self, args: &[&str]) -> String {
        must("ip", &self.exec_args(args))
    }

    fn spawn(&mut self, args: &[&str], log: &Path) {
        let log = std::fs::File::create(log).unwrap();
        let child = Command::new("ip")
            .args(self.exec_args(args))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// `curl` from this namespace: (status, body). Status 0: no HTTP answer.
    fn curl(&self, extra: &[&str], url: &str) -> (u16, String) {
        let mut args = vec!["curl", "-sS", "-m", "5", "-w", "\n%{http_code}"];
        args.extend_from_slice(extra);
        args.push(url);
        let output = run("ip", &self.exec_args(&args));
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (status.trim().parse().unwrap_or(0), body.to_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Polls `check` until it returns `Some`, or fails after [`WAIT`] saying what it waited for.
fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// An app that answers every request with `app <method> <path>`, on every address.
const APP: &str = r#"
import http.server, sys
class App(http.server.BaseHTTPRequestHandler):
    def answer(self):
        body = f"app {self.command} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_DELETE = answer
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), App).serve_forever()
"#;

#[test]
fn capture_sends_the_apps_port_through_the_sidecar() {
    if std::env::var("KEYGATE_NETNS").as_deref() != Ok("1") {
        eprintln!(
            "skipped: set KEYGATE_NETNS=1 where root, ip, nft, curl and python3 are available (scripts/test.sh does)"
        );
        return;
    }
    let id = std::process::id();
    let subnet = format!("10.251.{}", id % 250);
    let (pod_ip, client_ip) = (format!("{subnet}.1"), format!("{subnet}.2"));
    let mut pod = Netns::new(format!("kg-pod-{id}"));
    let client = Netns::new(format!("kg-client-{id}"));
    let (veth_pod, veth_client) = (format!("kgp{id}"), format!("kgc{id}"));
    let (veth_pod, veth_client) = (
        &veth_pod[..veth_pod.len().min(15)],
        &veth_client[..veth_client.len().min(15)],
    );
    must(
        "ip",
        &[
            "link",
            "add",
            veth_pod,
            "netns",
            &pod.name,
            "type",
            "veth",
            "peer",
            "name",
            veth_client,
            "netns",
            &client.name,
        ],
    );
    pod.must(&[
        "ip",
        "addr",
        "add",
        &format!("{pod_ip}/24"),
        "dev",
        veth_pod,
    ]);
    pod.must(&["ip", "link", "set", veth_pod, "up"]);
    client.must(&[
        "ip",
        "addr",
        "add",
        &format!("{client_ip}/24"),
        "dev",
        veth_client,
    ]);
    client.must(&["ip", "link", "set", veth_client, "up"]);

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/quickstart");
    let app_port = APP_PORT.to_string();
    pod.spawn(
        &["python3", "-c", APP, &app_port],
        &dir.path().join("app.log"),
    );
    let upstream = format!("127.0.0.1:{APP_PORT}");
    let (token_port, sidecar_port) = (TOKEN_PORT.to_string(), SIDECAR_PORT.to_string());
    pod.spawn(
        &[
            keygate(),
            "dev",
            "--config",
            config,
            "--state",
            state,
            "--bind",
            "0.0.0.0",
            "--port",
            &token_port,
            "--sidecar-port",
            &sidecar_port,
            "--upstream",
            &upstream,
        ],
        &dir.path().join("keygate-dev.log"),
    );

    let app_url = |path: &str| format!("http://{pod_ip}:{APP_PORT}{path}");
    let sidecar_url = format!("http://{pod_ip}:{SIDECAR_PORT}/healthz");
    eventually("the app on the pod's address", || {
        (client.curl(&[], &app_url("/healthz")).0 == 200).then_some(())
    });
    eventually("the sidecar on the pod's address", || {
        (client.curl(&[], &sidecar_url).0 == 200).then_some(())
    });

    // Before: anyone in the cluster reaches the app around the sidecar.
    let before = client.curl(&[], &app_url("/orders/1"));
    println!(
        "before capture: GET {} -> {} {:?}",
        app_url("/orders/1"),
        before.0,
        before.1
    );
    assert_eq!(before, (200, "app GET /orders/1".to_owned()));

    // Capture, twice: the second run must leave the same rules.
    let ports = app_port.clone();
    for _ in 0..2 {
        pod.must(&[
            keygate(),
            "capture",
            "--ports",
            &ports,
            "--to",
            &sidecar_port,
        ]);
    }
    let listing = pod.must(&["nft", "-j", "list", "table", "inet", "keygate_capture"]);
    let rules = listing.matches(r#"{"rule":"#).count();
    assert_eq!(
        rules, 2,
        "one redirect and one drop rule after two runs: {listing}"
    );
    println!(
        "{}",
        pod.must(&["nft", "list", "table", "inet", "keygate_capture"])
    );

    // After: the app's port answers only through the sidecar.
    let after = client.curl(&[], &app_url("/orders/1"));
    println!(
        "after capture: GET {} without a token -> {} {:?}",
        app_url("/orders/1"),
        after.0,
        after.1
    );
    assert_eq!(after.0, 401, "{after:?}");
    let health = client.curl(&[], &app_url("/healthz"));
    assert_eq!(
        health,
        (200, "app GET /healthz".to_owned()),
        "public rule, through the sidecar"
    );

    let credential = |field: &str| {
        must(
            keygate(),
            &[
                "dev",
                "credentials",
                "shop/reporting",
                "--state",
                state,
                "--field",
                field,
            ],
        )
    };
    let (secret, client_id) = (credential("client_secret"), credential("client_id"));
    let token_url = format!("http://{pod_ip}:{TOKEN_PORT}/oauth2/token");
    let token = client.must(&[
        keygate(),
        "token",
        "--token-url",
        &token_url,
        "--client-id",
        client_id.trim(),
        "--client-secret",
        secret.trim(),
        "--resource",
        RESOURCE,
    ]);
    let bearer = format!("Authorization: Bearer {}", token.trim());
    let read = client.curl(&["-H", &bearer], &app_url("/orders/1"));
    println!(
        "after capture: GET /orders/1 with a read token -> {} {:?}",
        read.0, read.1
    );
    assert_eq!(read, (200, "app GET /orders/1".to_owned()));
    let write = client.curl(&["-H", &bearer, "-X", "POST"], &app_url("/orders"));
    println!(
        "after capture: POST /orders with a read token -> {}",
        write.0
    );
    assert_eq!(write.0, 403, "{write:?}");

    // Inside the pod the app is still on loopback, which is how the sidecar reaches it.
    let inside = pod.curl(&[], &format!("http://127.0.0.1:{APP_PORT}/orders/1"));
    assert_eq!(inside, (200, "app GET /orders/1".to_owned()));
}
