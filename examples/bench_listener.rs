//! Benchmark: how fast the listener answers a signed webhook with 202 — the request parsed,
//! its signature checked, its run's row committed — over real HTTP on this host.
//!
//! `cargo run --release --example bench_listener -- [REQUESTS] [CLIENTS]` (default 5000
//! requests from 4 keep-alive clients). Uses the local Postgres and RabbitMQ (override with
//! JOBSCHLEUDER_TEST_DATABASE_URL and JOBSCHLEUDER_TEST_AMQP_URL) with a scratch database and
//! queue, both removed afterwards. Prints the answer time's percentiles and the request rate.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use jobschleuder::config::Config;
use jobschleuder::listener;
use jobschleuder::shutdown::Shutdown;
use jobschleuder::store::Store;
use sha2::Sha512;
use sqlx::{Connection, Executor, PgConnection};

const SECRET: &str = "bench-secret";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let requests: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(5_000);
    let clients: usize = std::env::args()
        .nth(2)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(4)
        .max(1);
    let admin = std::env::var("JOBSCHLEUDER_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let amqp = std::env::var("JOBSCHLEUDER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let name = format!("js_bench_listener_{}", std::process::id());
    let mut db_url = url::Url::parse(&admin)?;
    db_url.set_path(&format!("/{name}"));
    let text = format!(
        "database:\n  url: {db_url}\n  max_connections: 8\nrabbitmq:\n  url: {amqp}\n  queue: {name}\n\
         listener:\n  hooks:\n    nautobot:\n      job: backup\n      secret: {SECRET}\n      \
         arguments:\n        device: \"{{{{ data.name }}}}\"\n"
    );
    let config = Config::from_str_with_env(Path::new("bench.yaml"), &text, &|_| None)?;
    let store = Store::open(&config).await?;
    store
        .pg_pool()
        .expect("a Postgres store")
        .execute("INSERT INTO jobs (name, job) VALUES ('backup', 'hello_world')")
        .await?;
    let (stop, shutdown) = Shutdown::manual();
    let state = listener::start(&config, store.clone(), shutdown.clone()).await;
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = socket.local_addr()?;
    let app = listener::router(state).into_make_service_with_connect_info::<SocketAddr>();
    let mut stopping = shutdown.clone();
    let server = tokio::spawn(async move {
        axum::serve(socket, app)
            .with_graceful_shutdown(async move { stopping.wait().await })
            .await
    });
    println!("{requests} signed webhooks from {clients} keep-alive clients to {address}");

    // Warm-up: connections, prepared statements, the broker's queue.
    run_clients(address, 200.min(requests), 1).await?;
    let started = Instant::now();
    let mut latencies = run_clients(address, requests, clients).await?;
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| {
        let index = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies[index].as_secs_f64() * 1000.0
    };
    println!(
        "202 answer time: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        at(0.5),
        at(0.9),
        at(0.99),
        at(1.0)
    );
    println!(
        "throughput: {:.0} webhooks/s ({:.2}s)",
        requests as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    let created: i64 =
        sqlx::query_scalar("SELECT count(*) FROM job_runs WHERE trigger = 'webhook'")
            .fetch_one(store.pg_pool().expect("a Postgres store"))
            .await?;
    println!("runs recorded: {created}");

    stop.stop();
    let _ = server.await;
    store.pg_pool().expect("a Postgres store").close().await;
    let connection =
        lapin::Connection::connect(&amqp, lapin::ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    for queue in [name.clone(), format!("{name}.dead")] {
        let _ = channel
            .queue_delete(
                queue.as_str().into(),
                lapin::options::QueueDeleteOptions::default(),
            )
            .await;
    }
    let mut conn = PgConnection::connect(&admin).await?;
    conn.execute(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
        .await?;
    Ok(())
}

/// `requests` webhooks from `clients` threads, each on one keep-alive connection; the time
/// from sending each request to reading its whole answer.
async fn run_clients(
    address: SocketAddr,
    requests: usize,
    clients: usize,
) -> Result<Vec<Duration>, Box<dyn std::error::Error>> {
    let mut handles = Vec::new();
    for client in 0..clients {
        let count = requests / clients + usize::from(client < requests % clients);
        handles.push(tokio::task::spawn_blocking(move || {
            client_loop(address, client, count)
        }));
    }
    let mut all = Vec::with_capacity(requests);
    for handle in handles {
        all.extend(handle.await?.map_err(|e| e.to_string())?);
    }
    Ok(all)
}

fn client_loop(address: SocketAddr, client: usize, count: usize) -> Result<Vec<Duration>, String> {
    let stream = TcpStream::connect(address).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let body = serde_json::to_vec(&serde_json::json!({
            "event": "updated", "model": "dcim.device",
            "data": {"name": format!("sw-{client}-{i}")},
        }))
        .map_err(|e| e.to_string())?;
        let mut mac = Hmac::<Sha512>::new_from_slice(SECRET.as_bytes()).expect("any key");
        mac.update(&body);
        let signature = hex::encode(mac.finalize().into_bytes());
        let head = format!(
            "POST /hooks/nautobot HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n\
             X-Hook-Signature: {signature}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let sent = Instant::now();
        writer
            .write_all(&[head.as_bytes(), &body].concat())
            .map_err(|e| e.to_string())?;
        let status = read_response(&mut reader)?;
        latencies.push(sent.elapsed());
        if status != 202 {
            return Err(format!("answer {status}, not 202"));
        }
    }
    Ok(latencies)
}

/// Reads one HTTP/1.1 answer; returns its status.
fn read_response(reader: &mut BufReader<TcpStream>) -> Result<u16, String> {
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {line:?}"))?;
    let mut length = 0;
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(|_| "bad content-length")?;
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(status)
}
