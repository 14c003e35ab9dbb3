//! What the serving tests share: a private redis-server, ringlet-train runs, committing
//! checkpoints, reading streams.
#![allow(dead_code)]

use redis::streams::StreamRangeReply;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SERVE: &str = env!("CARGO_BIN_EXE_ringlet-serve");

pub fn sibling(name: &str) -> PathBuf {
    let p = Path::new(SERVE).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: cargo test --workspace --release",
        p.display()
    );
    p
}

/// One ringlet-train process (a world of one) with checkpoints in `dir`; its standard output.
pub fn train(args: &[&str], dir: &Path) -> String {
    let out = Command::new(sibling("ringlet-train"))
        .args(args)
        .arg("--checkpoint-dir")
        .arg(dir)
        .env("RANK", "0")
        .env("WORLD_SIZE", "1")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "ringlet-train {args:?}: {printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    printed
}

/// A private redis-server on a free port, stopped on drop.
pub struct Redis {
    child: Child,
    pub port: u16,
    /// Set where it listens beyond loopback (protected mode refuses others without one).
    pub password: Option<String>,
}

impl Redis {
    /// `None` (and a visible skip) where redis-server is not installed, except in CI.
    pub fn start() -> Option<Redis> {
        Redis::start_on(&[])
    }

    /// As [`start`](Self::start), listening on `also` as well as on loopback, with a password
    /// then.
    pub fn start_on(also: &[&str]) -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CI").is_none_or(|v| v.is_empty() || v == "false"),
                "CI: redis-server is missing (.ci/run installs it)"
            );
            ringlet_core::skipped!("redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let password = (!also.is_empty()).then(|| format!("ringlet-test-{}", std::process::id()));
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(also)
            .args(password.iter().flat_map(|p| ["--requirepass", p.as_str()]))
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let r = Redis {
            child,
            port,
            password,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.conn_result().is_err() {
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(r)
    }

    pub fn url(&self) -> String {
        self.url_at("127.0.0.1")
    }

    /// The URL of this server at `host`.
    pub fn url_at(&self, host: &str) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@{host}:{}", self.port),
            None => format!("redis://{host}:{}", self.port),
        }
    }

    pub fn conn_result(&self) -> redis::RedisResult<redis::Connection> {
        let c = redis::Client::open(self.url())?;
        let mut conn = c.get_connection_with_timeout(Duration::from_secs(5))?;
        redis::cmd("PING").query::<String>(&mut conn)?;
        Ok(conn)
    }

    pub fn conn(&self) -> redis::Connection {
        let conn = self.conn_result().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        conn
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Commits checkpoint `from` into `dir` as the trainer does: complete under a temporary name,
/// then renamed into place; `corrupt` flips one byte of the model file first.
pub fn commit(from: &Path, dir: &Path, corrupt: bool) {
    let name = from.file_name().unwrap();
    let tmp = dir.join(format!(".tmp-{}", name.to_string_lossy()));
    copy_dir(from, &tmp);
    if corrupt {
        let f = tmp.join("model.safetensors");
        let mut bytes = std::fs::read(&f).unwrap();
        let at = bytes.len() - 100;
        bytes[at] ^= 0x40;
        std::fs::write(&f, bytes).unwrap();
    }
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// Every entry of `stream` as (entry id, fields).
pub fn entries(
    conn: &mut redis::Connection,
    stream: &str,
) -> Vec<(String, HashMap<String, String>)> {
    let mut out = Vec::new();
    let mut from = "-".to_string();
    loop {
        let r: StreamRangeReply = redis::cmd("XRANGE")
            .arg(stream)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(1000)
            .query(conn)
            .unwrap();
        let n = r.ids.len();
        for e in r.ids {
            from = format!("({}", e.id);
            let fields = e
                .map
                .keys()
                .map(|k| (k.clone(), e.get::<String>(k).unwrap_or_default()))
                .collect();
            out.push((e.id, fields));
        }
        if n < 1000 {
            return out;
        }
    }
}
