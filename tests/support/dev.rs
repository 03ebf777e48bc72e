//! `keygate dev` as a child process, for tests that drive it over real HTTP: start it on
//! free ports, find its token server and sidecars in the walkthrough it prints, read the
//! credentials it keeps, and wait for what it logs.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running `keygate dev`; killed when dropped.
pub struct Dev {
    child: Child,
    pub token_url: String,
    /// Each ScopePolicy's sidecar (`namespace/name` → `http://addr`).
    pub sidecars: BTreeMap<String, String>,
    pub stderr: Arc<Mutex<String>>,
}

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dev {
    /// The base URL of the sidecar of ScopePolicy `policy` (`namespace/name`).
    pub fn sidecar(&self, policy: &str) -> &str {
        self.sidecars
            .get(policy)
            .unwrap_or_else(|| panic!("no sidecar for {policy}: {:?}", self.sidecars))
    }

    /// How much has been logged so far, for [`wait_for_log`]'s `from`.
    pub fn log_len(&self) -> usize {
        self.stderr.lock().unwrap().len()
    }
}

/// An example's directory under `examples/`.
pub fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(path)
}

/// Copies the files (not subdirectories) of `from` into `to`.
pub fn copy_files(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

fn dev_command(config: &Path, state: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keygate"));
    command
        .args([
            "dev",
            "--port",
            "0",
            "--sidecar-port",
            "0",
            "--reload-interval",
            "200ms",
        ])
        .args(extra)
        .arg("--config")
        .arg(config)
        .arg("--state")
        .arg(state)
        .env("KEYGATE_LOG", "info");
    command
}

/// Starts `keygate dev` on free ports and waits for its walkthrough.
/// An example's files copied into a configuration directory of the test's own, beside an
/// empty state directory: what `keygate dev --config … --state …` is started with.
pub struct ExampleCopy {
    pub config: tempfile::TempDir,
    state_dir: tempfile::TempDir,
}

impl ExampleCopy {
    /// A copy of `examples/<name>`.
    pub fn new(name: &str) -> Self {
        let config = tempfile::tempdir().expect("tempdir");
        copy_files(&example(name), config.path());
        let state_dir = tempfile::tempdir().expect("tempdir");
        Self { config, state_dir }
    }

    /// The state directory (not yet created: `keygate dev` makes it).
    pub fn state(&self) -> PathBuf {
        self.state_dir.path().join("state")
    }

    /// `keygate dev` on this copy, with `extra` options.
    pub fn start(&self, extra: &[&str]) -> Dev {
        start_with(self.config.path(), &self.state(), extra)
    }
}

pub fn start(config: &Path, state: &Path) -> Dev {
    start_with(config, state, &[])
}

/// Starts `keygate dev` with `extra` options (e.g. `--upstream`).
pub fn start_with(config: &Path, state: &Path, extra: &[&str]) -> Dev {
    let mut child = dev_command(config, state, extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("keygate dev starts");
    let stderr = Arc::new(Mutex::new(String::new()));
    let err_pipe = child.stderr.take().unwrap();
    let sink = stderr.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
            sink.lock().unwrap().push_str(&(line + "\n"));
        }
    });
    let mut token_url = None;
    let mut sidecars = BTreeMap::new();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // The walkthrough lists the token server, then one line per sidecar, then a blank line.
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("keygate dev exited early:\n{}", stderr.lock().unwrap()))
            .unwrap();
        let mut words = line.split_whitespace();
        match words.next() {
            Some("token") => {
                token_url = words
                    .find(|w| w.starts_with("http://"))
                    .map(|u| format!("{u}/oauth2/token"));
            }
            Some("sidecar") => {
                let url = words.next().expect("sidecar address").to_owned();
                let policy = words
                    .skip_while(|w| *w != "ScopePolicy")
                    .nth(1)
                    .expect("the sidecar's ScopePolicy")
                    .trim_end_matches(',')
                    .to_owned();
                sidecars.insert(policy, url);
            }
            _ if token_url.is_some() && !sidecars.is_empty() => break,
            _ => {}
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Dev {
        child,
        token_url: token_url.expect("the token server's address"),
        sidecars,
        stderr,
    }
}

/// Runs `keygate dev` expecting it to refuse the configuration; returns its error output.
pub fn refused(config: &Path, state: &Path) -> String {
    let output = dev_command(config, state, &[]).output().unwrap();
    assert!(
        !output.status.success(),
        "keygate dev accepted {}:\n{}",
        config.display(),
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `keygate dev <args>` (a subcommand such as `credentials` or `rotate`), which must
/// succeed; returns its standard output, trimmed.
pub fn dev_subcommand(args: &[&str], paths: &[(&str, &Path)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_keygate"));
    command.arg("dev").args(args);
    for (flag, path) in paths {
        command.arg(flag).arg(path);
    }
    let output: Output = command.output().unwrap();
    assert!(
        output.status.success(),
        "keygate dev {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// One credential of `client` as `keygate dev credentials` prints it.
pub fn credential(state: &Path, client: &str, field: &str) -> String {
    dev_subcommand(
        &["credentials", client, "--field", field],
        &[("--state", state)],
    )
}

/// Asks the token server for a token for `resource` (client_secret_basic).
pub async fn token(
    http: &reqwest::Client,
    dev: &Dev,
    id: &str,
    secret: &str,
    resource: &str,
) -> reqwest::Response {
    http.post(&dev.token_url)
        .basic_auth(id, Some(secret))
        .form(&[("grant_type", "client_credentials"), ("resource", resource)])
        .send()
        .await
        .unwrap()
}

/// A token for `resource`, which the token server must grant.
pub async fn access_token(
    http: &reqwest::Client,
    dev: &Dev,
    id: &str,
    secret: &str,
    resource: &str,
) -> String {
    let response = token(http, dev, id, secret, resource).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

/// The status of `GET url`, with `bearer` as the bearer token if given.
pub async fn get(http: &reqwest::Client, url: &str, bearer: Option<&str>) -> u16 {
    let mut request = http.get(url);
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

/// Waits until stderr contains `needle` after `from` (bounded), returning whether it did.
pub fn wait_for_log(dev: &Dev, needle: &str, from: usize) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if dev.stderr.lock().unwrap()[from..].contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}
