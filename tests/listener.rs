//! The listener: webhooks into runs, every refusal, the JSON API, health and metrics — the
//! router in-process against the real Postgres and RabbitMQ, and the real binary for signals
//! and the end-to-end run.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Sha256, Sha512};
use tower::ServiceExt;

use jobschleuder::config::Config;
use jobschleuder::listener::{self, State};
use jobschleuder::shutdown::{ManualStop, Shutdown};
use jobschleuder::store::Store;

use crate::util::backend::Backend;
use crate::util::cluster::{Cluster, Process};

const SECRET: &str = "s3cret";
const API_TOKEN: &str = "api-t0ken";

const JOBS: &str = "jobs:
  - id: backup
    job: test_echo
    description: config backup of one device
    arguments:
      kind: config
      device: placeholder
";

/// A Nautobot webhook body for a device change.
fn nautobot_payload(device: &str, event: &str) -> Value {
    json!({
        "event": event,
        "timestamp": "2026-11-28 10:00:00.000000+00:00",
        "model": "device",
        "username": "admin",
        "request_id": "0b0c6a4e-5f4b-4a7c-9a43-2f5a4c1d9e10",
        "data": {"id": "8e1b1d8e-0000-4000-8000-000000000001", "name": device, "status": {"value": "active"}},
        "snapshots": {"prechange": null, "postchange": null, "differences": null},
    })
}

/// The hex HMAC-SHA512 of `body`, computed by Python's hmac module the way Nautobot and
/// NetBox compute `X-Hook-Signature` — not by the code under test.
fn python_signature(secret: &str, body: &[u8], algorithm: &str) -> String {
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            &format!(
                "import hmac, hashlib, sys; print(hmac.new(sys.argv[1].encode('utf8'), sys.stdin.buffer.read(), hashlib.{algorithm}).hexdigest())"
            ),
            secret,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (installed by .ci/run)");
    child.stdin.take().unwrap().write_all(body).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success());
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

fn hmac512(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha512>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

fn hmac256(secret: &str, body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

/// The router over a cluster's database and queue, in this process.
struct Web {
    cluster: Cluster,
    state: Arc<State>,
    app: Router,
    _stop: ManualStop,
}

impl Web {
    async fn new(listener: &str) -> Web {
        Self::with_rabbitmq("", listener).await
    }

    async fn with_rabbitmq(rabbitmq: &str, listener: &str) -> Web {
        let cluster = Cluster::with_rabbitmq(
            rabbitmq,
            &format!("listener:\n  api_token: {API_TOKEN}\n{listener}"),
        )
        .await;
        Self::serving(cluster).await
    }

    /// [`Web::new`] on `backend`; `None` (after a notice) without its servers.
    async fn on(backend: Backend, test: &str, listener: &str) -> Option<Web> {
        let cluster = Cluster::on(
            backend,
            test,
            &format!("listener:\n  api_token: {API_TOKEN}\n{listener}"),
        )
        .await?;
        Some(Self::serving(cluster).await)
    }

    async fn serving(cluster: Cluster) -> Web {
        cluster.import(JOBS);
        let url = cluster.db.url.clone();
        let postgres = cluster.backend.postgres();
        let config = Config::load_with_env(Some(&cluster.config), &|key| {
            (key == "JOBSCHLEUDER_DATABASE_URL" && postgres).then(|| url.clone())
        })
        .expect("config loads");
        let store = Store::open(&config).await.expect("database");
        let (stop, shutdown) = Shutdown::manual();
        let state = listener::start(&config, store, shutdown).await;
        let app = listener::router(state.clone());
        Web {
            cluster,
            state,
            app,
            _stop: stop,
        }
    }

    async fn send(&self, request: Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        (status, headers, body)
    }

    /// A Nautobot-signed POST of `payload` to `/hooks/<hook><query>`.
    async fn nautobot(&self, hook: &str, query: &str, payload: &Value) -> (StatusCode, Value) {
        let body = serde_json::to_vec(payload).unwrap();
        let request = Request::post(format!("/hooks/{hook}{query}"))
            .header("content-type", "application/json")
            .header("x-hook-signature", hmac512(SECRET, &body))
            .body(Body::from(body))
            .unwrap();
        let (status, _, body) = self.send(request).await;
        (status, body)
    }

    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {API_TOKEN}"));
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let body = body.map(|b| Body::from(b.to_string())).unwrap_or_default();
        let (status, _, body) = self.send(request.body(body).unwrap()).await;
        (status, body)
    }

    async fn runs(&self) -> i64 {
        self.cluster.count("SELECT count(*) FROM job_runs").await
    }
}

const NAUTOBOT_HOOK: &str = "  hooks:
    nautobot:
      job: backup
      secret: s3cret
      arguments:
        device: \"{{ data.name }}\"
        event: \"{{ event }}\"
        request: \"{{ request_id }}\"
";

fn run_ids(body: &Value) -> Vec<String> {
    body["run_ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no run_ids in {body}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

crate::on_every_backend! {
async fn a_signed_nautobot_webhook_creates_one_run_and_publishes_it(backend: Backend) {
    let Some(web) = Web::on(
        backend,
        "a_signed_nautobot_webhook_creates_one_run_and_publishes_it",
        NAUTOBOT_HOOK,
    )
    .await
    else {
        return;
    };
    let payload = nautobot_payload("sw-fra-01", "updated");
    let body = serde_json::to_vec(&payload).unwrap();
    // Signed the way Nautobot signs, by another implementation than ours.
    let signature = python_signature(SECRET, &body, "sha512");
    assert_eq!(signature, hmac512(SECRET, &body));
    let request = Request::post("/hooks/nautobot")
        .header("content-type", "application/json")
        .header("x-hook-signature", signature)
        .body(Body::from(body))
        .unwrap();
    let (status, _, answer) = web.send(request).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let ids = run_ids(&answer);
    assert_eq!(ids.len(), 1);
    assert_eq!(answer["status_url"], format!("/api/runs/{}", ids[0]));
    let run = web.cluster.run(&ids[0]).await;
    let (trigger, arguments) = (run.trigger, run.arguments);
    assert_eq!(trigger, "webhook");
    // Rendered arguments over the job's own.
    assert_eq!(
        arguments,
        json!({"kind": "config", "device": "sw-fra-01", "event": "updated",
               "request": "0b0c6a4e-5f4b-4a7c-9a43-2f5a4c1d9e10"})
    );
    // Then published: the message is on the queue and the row says so.
    let id = uuid::Uuid::parse_str(&ids[0]).unwrap();
    web.cluster
        .wait_until(
            "the webhook's run is published",
            Duration::from_secs(20),
            &format!(
                "SELECT count(*) = 1 FROM job_runs WHERE id = {} AND published_at IS NOT NULL",
                web.cluster.id(id)
            ),
        )
        .await;
    let messages = web.cluster.drain_queue().await;
    assert_eq!(messages.len(), 1);
    let message: Value = serde_json::from_slice(&messages[0]).unwrap();
    assert_eq!(message["cmd"], "test_echo");
    assert_eq!(message["args"]["device"], "sw-fra-01");
    assert_eq!(message["run_id"], ids[0].as_str());
    assert_eq!(web.runs().await, 1);
}
}

#[tokio::test]
async fn every_refusal_answers_its_code_and_creates_nothing() {
    crate::needs_servers!("every_refusal_answers_its_code_and_creates_nothing");
    let web = Web::new(
        "  hooks:
    nautobot:
      job: backup
      secret: s3cret
      max_body: 2KiB
      arguments:
        device: \"{{ data.name }}\"
    tokened:
      job: backup
      token: t0k3n
    fenced:
      job: backup
      secret: s3cret
      allow: [192.0.2.0/24]
    limited:
      job: backup
      secret: s3cret
      rate: 2/min
    ghost:
      job: no_such_job
      secret: s3cret
",
    )
    .await;
    let payload = nautobot_payload("sw-fra-01", "updated");
    let body = serde_json::to_vec(&payload).unwrap();
    let post = |hook: &str| {
        Request::post(format!("/hooks/{hook}")).header("content-type", "application/json")
    };
    let post_to = |uri: &str| Request::post(uri).header("content-type", "application/json");
    let check =
        |expected: StatusCode, (status, _, answer): (StatusCode, HeaderMap, Value), what: &str| {
            assert_eq!(status, expected, "{what}: {answer}");
            assert!(
                answer["error"].is_string(),
                "{what}: a JSON error: {answer}"
            );
            assert!(
                !answer.to_string().contains(SECRET),
                "{what}: the secret leaks: {answer}"
            );
            answer
        };

    let answer = check(
        StatusCode::NOT_FOUND,
        web.send(post("nope").body(Body::from(body.clone())).unwrap())
            .await,
        "unknown hook",
    );
    assert!(answer["error"].as_str().unwrap().contains("nope"));
    check(
        StatusCode::UNAUTHORIZED,
        web.send(post("nautobot").body(Body::from(body.clone())).unwrap())
            .await,
        "no signature",
    );
    check(
        StatusCode::UNAUTHORIZED,
        web.send(
            post("nautobot")
                .header("x-hook-signature", hmac512("wrong", &body))
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await,
        "wrong signature",
    );
    // The signature covers the raw body: a changed body fails.
    let mut tampered = body.clone();
    tampered.push(b' ');
    check(
        StatusCode::UNAUTHORIZED,
        web.send(
            post("nautobot")
                .header("x-hook-signature", hmac512(SECRET, &body))
                .body(Body::from(tampered))
                .unwrap(),
        )
        .await,
        "tampered body",
    );
    check(
        StatusCode::UNAUTHORIZED,
        web.send(post("tokened").body(Body::from(body.clone())).unwrap())
            .await,
        "no token",
    );
    check(
        StatusCode::UNAUTHORIZED,
        web.send(
            post("tokened")
                .header("authorization", "Bearer nope")
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await,
        "wrong token",
    );
    check(
        StatusCode::FORBIDDEN,
        web.send(
            post("fenced")
                .header("x-hook-signature", hmac512(SECRET, &body))
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await,
        "no peer address in the allowed network",
    );
    let big = json!({"data": {"name": "x".repeat(4096)}});
    let big = serde_json::to_vec(&big).unwrap();
    check(
        StatusCode::PAYLOAD_TOO_LARGE,
        web.send(
            post("nautobot")
                .header("x-hook-signature", hmac512(SECRET, &big))
                .body(Body::from(big))
                .unwrap(),
        )
        .await,
        "over max_body",
    );
    check(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        web.send(
            Request::post("/hooks/nautobot")
                .header("content-type", "text/plain")
                .header("x-hook-signature", hmac512(SECRET, &body))
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await,
        "not JSON",
    );
    let broken = b"{\"data\": ".to_vec();
    check(
        StatusCode::BAD_REQUEST,
        web.send(
            post("nautobot")
                .header("x-hook-signature", hmac512(SECRET, &broken))
                .body(Body::from(broken))
                .unwrap(),
        )
        .await,
        "malformed JSON",
    );
    let answer = check(
        StatusCode::BAD_REQUEST,
        web.send(
            post_to("/hooks/nautobot?wait=soon")
                .header("x-hook-signature", hmac512(SECRET, &body))
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await,
        "a malformed wait",
    );
    assert!(
        answer["error"].as_str().unwrap().contains("wait"),
        "{answer}"
    );
    let nameless = serde_json::to_vec(&json!({"event": "updated", "data": {"id": 1}})).unwrap();
    let answer = check(
        StatusCode::UNPROCESSABLE_ENTITY,
        web.send(
            post("nautobot")
                .header("x-hook-signature", hmac512(SECRET, &nameless))
                .body(Body::from(nameless))
                .unwrap(),
        )
        .await,
        "template field missing",
    );
    assert!(
        answer["error"].as_str().unwrap().contains("data.name"),
        "{answer}"
    );
    check(
        StatusCode::INTERNAL_SERVER_ERROR,
        web.send(
            post("ghost")
                .header("x-hook-signature", hmac512(SECRET, &body))
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await,
        "a hook naming a job not in the registry",
    );
    assert_eq!(web.runs().await, 0, "refusals create nothing");

    // Rate: two a minute pass, the third gets 429 with Retry-After.
    for _ in 0..2 {
        let (status, _, answer) = web
            .send(
                post("limited")
                    .header("x-hook-signature", hmac512(SECRET, &body))
                    .body(Body::from(body.clone()))
                    .unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    }
    let refused = web
        .send(
            post("limited")
                .header("x-hook-signature", hmac512(SECRET, &body))
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await;
    let retry_after: u64 = refused.1["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    check(StatusCode::TOO_MANY_REQUESTS, refused, "over the rate");
    assert_eq!(web.runs().await, 2);

    // Routes and methods that do not exist answer JSON too.
    check(
        StatusCode::NOT_FOUND,
        web.send(Request::get("/nowhere").body(Body::empty()).unwrap())
            .await,
        "unknown route",
    );
    check(
        StatusCode::METHOD_NOT_ALLOWED,
        web.send(Request::get("/hooks/nautobot").body(Body::empty()).unwrap())
            .await,
        "GET on a hook",
    );
}

#[tokio::test]
async fn allowed_networks_see_the_client_behind_a_trusted_proxy() {
    crate::needs_servers!("allowed_networks_see_the_client_behind_a_trusted_proxy");
    let web = Web::new(
        "  trusted_proxies: [127.0.0.1]
  hooks:
    fenced:
      job: backup
      secret: s3cret
      allow: [192.0.2.0/24]
",
    )
    .await;
    let body = serde_json::to_vec(&nautobot_payload("sw1", "created")).unwrap();
    let send = |peer: &str, forwarded: &str| {
        let mut request = Request::post("/hooks/fenced")
            .header("content-type", "application/json")
            .header("x-hook-signature", hmac512(SECRET, &body))
            .header("x-forwarded-for", forwarded)
            .body(Body::from(body.clone()))
            .unwrap();
        let peer: std::net::SocketAddr = format!("{peer}:40000").parse().unwrap();
        request
            .extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        web.send(request)
    };
    // Behind the proxy: the forwarded client counts, whatever it claims before.
    assert_eq!(
        send("127.0.0.1", "10.9.9.9, 192.0.2.7").await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send("127.0.0.1", "192.0.2.7, 198.51.100.4").await.0,
        StatusCode::FORBIDDEN
    );
    // Not from the proxy: its own claim is not believed.
    assert_eq!(
        send("198.51.100.4", "192.0.2.7").await.0,
        StatusCode::FORBIDDEN
    );
    assert_eq!(send("192.0.2.9", "").await.0, StatusCode::ACCEPTED);
    assert_eq!(web.runs().await, 2);
}

#[tokio::test]
async fn netbox_github_generic_and_rotated_secrets_are_verified_as_their_senders_sign() {
    crate::needs_servers!(
        "netbox_github_generic_and_rotated_secrets_are_verified_as_their_senders_sign"
    );
    let web = Web::new(
        "  hooks:
    netbox:
      job: backup
      secrets: [old-secret, s3cret]
      signature: netbox
    github:
      job: backup
      secret: s3cret
      signature: github
    custom:
      job: backup
      secret: s3cret
      signature: {header: X-Signature, algorithm: sha256, prefix: 'v1=', encoding: base64}
",
    )
    .await;
    let body = serde_json::to_vec(&json!({"event": "created", "data": {"name": "r1"}})).unwrap();
    let send = |hook: &str, header: &str, value: String| {
        web.send(
            Request::post(format!("/hooks/{hook}"))
                .header("content-type", "application/json")
                .header(header, value)
                .body(Body::from(body.clone()))
                .unwrap(),
        )
    };
    // NetBox: X-Hook-Signature, hex HMAC-SHA512; either secret of a rotation.
    assert_eq!(
        send(
            "netbox",
            "X-Hook-Signature",
            python_signature("s3cret", &body, "sha512")
        )
        .await
        .0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send(
            "netbox",
            "X-Hook-Signature",
            python_signature("old-secret", &body, "sha512")
        )
        .await
        .0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send(
            "netbox",
            "X-Hook-Signature",
            python_signature("other", &body, "sha512")
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    // GitHub: X-Hub-Signature-256: sha256=<hex HMAC-SHA256>.
    let github = format!("sha256={}", python_signature("s3cret", &body, "sha256"));
    assert_eq!(
        send("github", "X-Hub-Signature-256", github.clone())
            .await
            .0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send(
            "github",
            "X-Hub-Signature-256",
            github.replace("sha256=", "")
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED,
        "the prefix is part of the format"
    );
    use base64::Engine;
    let generic = format!(
        "v1={}",
        base64::engine::general_purpose::STANDARD.encode(hmac256("s3cret", &body))
    );
    assert_eq!(
        send("custom", "X-Signature", generic).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        send(
            "custom",
            "X-Signature",
            format!("v1={}", hex::encode(hmac256("s3cret", &body)))
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(web.runs().await, 4);
}

#[tokio::test]
async fn filters_take_only_matching_webhooks_and_for_each_fans_out() {
    crate::needs_servers!("filters_take_only_matching_webhooks_and_for_each_fans_out");
    let web = Web::new(
        "  hooks:
    devices:
      job: backup
      secret: s3cret
      filter:
        all:
          - {path: model, equals: device}
          - {path: event, in: [created, updated]}
          - {path: data.name, matches: '^sw-'}
          - any:
              - {path: data.status.value, equals: active}
              - {path: data.force, exists: true}
      arguments:
        device: \"{{ data.name }}\"
    batch:
      job: backup
      secret: s3cret
      for_each: data.devices
      arguments:
        device: \"{{ item.name }}\"
        site: \"{{ data.site }}\"
        position: \"{{ item.position }}\"
",
    )
    .await;
    let (status, answer) = web
        .nautobot("devices", "", &nautobot_payload("sw-fra-01", "deleted"))
        .await;
    assert_eq!(
        (status, answer.clone()),
        (StatusCode::OK, json!({"matched": false}))
    );
    let (status, _) = web
        .nautobot("devices", "", &nautobot_payload("rtr-01", "updated"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut inactive = nautobot_payload("sw-fra-02", "updated");
    inactive["data"]["status"]["value"] = json!("planned");
    assert_eq!(
        web.nautobot("devices", "", &inactive).await.1,
        json!({"matched": false})
    );
    assert_eq!(web.runs().await, 0);
    inactive["data"]["force"] = json!(true);
    assert_eq!(
        web.nautobot("devices", "", &inactive).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(
        web.nautobot("devices", "", &nautobot_payload("sw-fra-03", "created"))
            .await
            .0,
        StatusCode::ACCEPTED
    );
    assert_eq!(web.runs().await, 2);

    let (status, answer) = web
        .nautobot(
            "batch",
            "",
            &json!({"data": {"site": "fra", "devices": [
                {"name": "sw1", "position": 1}, {"name": "sw2", "position": 2}, {"name": "sw3", "position": 3}]}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(run_ids(&answer).len(), 3);
    let rows: Vec<(Value,)> = sqlx::query_as(
        "SELECT arguments FROM job_runs WHERE id = ANY($1::text[]::uuid[]) ORDER BY arguments->>'device'",
    )
    .bind(run_ids(&answer))
    .fetch_all(&web.cluster.pool)
    .await
    .unwrap();
    let arguments: Vec<Value> = rows.into_iter().map(|r| r.0).collect();
    assert_eq!(
        arguments,
        vec![
            json!({"kind": "config", "device": "sw1", "site": "fra", "position": 1}),
            json!({"kind": "config", "device": "sw2", "site": "fra", "position": 2}),
            json!({"kind": "config", "device": "sw3", "site": "fra", "position": 3}),
        ],
        "a field alone keeps its JSON type (position is a number)"
    );
    let (status, answer) = web
        .nautobot(
            "batch",
            "",
            &json!({"data": {"site": "fra", "devices": "sw1"}}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(web.runs().await, 5);
}

crate::on_every_backend! {
async fn a_repeated_delivery_gets_the_first_runs_and_creates_nothing(backend: Backend) {
    let Some(web) = Web::on(
        backend,
        "a_repeated_delivery_gets_the_first_runs_and_creates_nothing",
        "  hooks:
    github:
      job: backup
      secret: s3cret
      signature: github
      dedupe: {header: X-GitHub-Delivery}
    keyed:
      job: backup
      secret: s3cret
      dedupe: {key: \"{{ request_id }}-{{ data.id }}\"}
      dedupe_ttl: 1h
",
    )
    .await
    else {
        return;
    };
    let body = serde_json::to_vec(&json!({"action": "push"})).unwrap();
    let send = |delivery: Option<&str>| {
        let mut request = Request::post("/hooks/github")
            .header("content-type", "application/json")
            .header(
                "x-hub-signature-256",
                format!("sha256={}", hex::encode(hmac256(SECRET, &body))),
            );
        if let Some(delivery) = delivery {
            request = request.header("x-github-delivery", delivery);
        }
        web.send(request.body(Body::from(body.clone())).unwrap())
    };
    let (first_status, _, first) = send(Some("d-1")).await;
    assert_eq!(first_status, StatusCode::ACCEPTED, "{first}");
    let (again_status, _, again) = send(Some("d-1")).await;
    assert_eq!(again_status, StatusCode::OK, "{again}");
    assert_eq!(run_ids(&again), run_ids(&first));
    assert_eq!(again["duplicate"], true);
    assert_eq!(send(Some("d-2")).await.0, StatusCode::ACCEPTED);
    assert_eq!(
        send(None).await.0,
        StatusCode::UNPROCESSABLE_ENTITY,
        "no delivery header"
    );
    assert_eq!(web.runs().await, 2);

    // Concurrent repeats of one key: one run among them.
    let payload = nautobot_payload("sw1", "updated");
    let answers =
        futures_util::future::join_all((0..6).map(|_| web.nautobot("keyed", "", &payload))).await;
    let mut ids: Vec<Vec<String>> = answers.iter().map(|(_, body)| run_ids(body)).collect();
    ids.dedup();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert_eq!(
        answers
            .iter()
            .filter(|(s, _)| *s == StatusCode::ACCEPTED)
            .count(),
        1
    );
    assert_eq!(web.runs().await, 3);
    let keys = web
        .cluster
        .count("SELECT count(*) FROM webhook_keys WHERE kind = 'dedupe'")
        .await;
    assert_eq!(keys, 3);
    // An expired key counts as new.
    web.cluster
        .sql("UPDATE webhook_keys SET expires_at = '2000-01-01T00:00:00+00:00'")
        .await;
    assert_eq!(
        web.nautobot("keyed", "", &payload).await.0,
        StatusCode::ACCEPTED
    );
    assert_eq!(web.runs().await, 4);
}
}

crate::on_every_backend! {
async fn a_burst_within_the_debounce_window_becomes_one_run_started_when_it_ends(backend: Backend) {
    let Some(web) = Web::on(
        backend,
        "a_burst_within_the_debounce_window_becomes_one_run_started_when_it_ends",
        "  hooks:
    nautobot:
      job: backup
      secret: s3cret
      debounce: 2s
      arguments:
        device: \"{{ data.name }}\"
    changes:
      job: backup
      secret: s3cret
      debounce: 1h
      debounce_key: \"{{ data.name }}\"
      arguments:
        device: \"{{ data.name }}\"
        event: \"{{ event }}\"
",
    )
    .await
    else {
        return;
    };
    // A burst keyed on the device: one run, which takes the latest request's arguments.
    let mut changes = Vec::new();
    for event in ["created", "updated", "deleted"] {
        let (status, answer) = web
            .nautobot("changes", "", &nautobot_payload("sw-ham-01", event))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        changes.push(run_ids(&answer));
    }
    changes.dedup();
    assert_eq!(changes.len(), 1, "{changes:?}");
    let event = web.cluster.run(&changes[0][0]).await.arguments["event"].clone();
    assert_eq!(event, "deleted");
    web.cluster.sql("DELETE FROM job_runs").await;

    let mut ids = Vec::new();
    for _ in 0..4 {
        let (status, answer) = web
            .nautobot("nautobot", "", &nautobot_payload("sw-fra-01", "updated"))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        ids.push(run_ids(&answer));
    }
    let (_, other) = web
        .nautobot("nautobot", "", &nautobot_payload("sw-ber-01", "updated"))
        .await;
    ids.dedup();
    assert_eq!(ids.len(), 1, "one run for the burst: {ids:?}");
    assert_ne!(run_ids(&other), ids[0], "another device is another burst");
    assert_eq!(web.runs().await, 2);
    let waiting = web
        .cluster
        .runs()
        .await
        .iter()
        .filter(|r| r.not_before == Some(r.created_at + chrono::Duration::seconds(2)))
        .count();
    assert_eq!(waiting, 2, "the runs wait for their window to end");
    // When the windows end, each run is published once.
    web.cluster
        .wait_until(
            "the debounced runs are published",
            Duration::from_secs(30),
            "SELECT count(*) = 2 FROM job_runs WHERE published_at IS NOT NULL AND published_at >= not_before",
        )
        .await;
    let messages = web.cluster.drain_queue().await;
    assert_eq!(messages.len(), 2);
    // After the window, the same device starts a new burst.
    let (_, later) = web
        .nautobot("nautobot", "", &nautobot_payload("sw-fra-01", "updated"))
        .await;
    assert_ne!(run_ids(&later), ids[0]);
    assert_eq!(web.runs().await, 3);
}
}

#[tokio::test]
async fn a_dry_run_answers_what_would_be_created_and_creates_nothing() {
    crate::needs_servers!("a_dry_run_answers_what_would_be_created_and_creates_nothing");
    let web = Web::new(NAUTOBOT_HOOK).await;
    let body = serde_json::to_vec(&nautobot_payload("sw-fra-01", "updated")).unwrap();
    let (status, _, answer) = web
        .send(
            Request::post("/hooks/nautobot")
                .header("content-type", "application/json")
                .header("x-hook-signature", hmac512(SECRET, &body))
                .header("X-Jobschleuder-Dry-Run", "1")
                .body(Body::from(body))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["dry_run"], true);
    assert_eq!(answer["runs"][0]["job"], "backup");
    assert_eq!(answer["runs"][0]["arguments"]["device"], "sw-fra-01");
    assert_eq!(answer["runs"][0]["arguments"]["kind"], "config");
    assert_eq!(web.runs().await, 0);
}

crate::on_every_backend! {
async fn the_api_lists_jobs_starts_runs_and_shows_them_behind_its_token(backend: Backend) {
    let Some(web) = Web::on(backend, "the_api_lists_jobs_starts_runs_and_shows_them_behind_its_token", NAUTOBOT_HOOK).await else {
        return;
    };
    for (token, what) in [(None, "no token"), (Some("wrong"), "a wrong token")] {
        let mut request = Request::get("/api/jobs");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let (status, _, answer) = web.send(request.body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {answer}");
        assert!(!answer.to_string().contains(API_TOKEN));
    }
    let (status, jobs) = web.api("GET", "/api/jobs", None).await;
    assert_eq!(status, StatusCode::OK, "{jobs}");
    assert_eq!(jobs["jobs"][0]["name"], "backup");
    assert_eq!(jobs["jobs"][0]["job"], "test_echo");

    let (status, started) = web
        .api(
            "POST",
            "/api/jobs/backup/run",
            Some(json!({"device": "sw-api-01"})),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let id = started["run_id"].as_str().unwrap().to_string();
    let (status, run) = web.api("GET", &format!("/api/runs/{id}"), None).await;
    assert_eq!(status, StatusCode::OK, "{run}");
    assert_eq!(run["trigger"], "manual");
    assert_eq!(
        run["arguments"],
        json!({"kind": "config", "device": "sw-api-01"})
    );
    assert_eq!(run["children"], json!([]));
    for field in [
        "status",
        "attempt",
        "worker",
        "result",
        "error",
        "created_at",
        "started_at",
        "finished_at",
    ] {
        assert!(run.get(field).is_some(), "{field} in {run}");
    }
    // An empty body runs the job with its own arguments.
    let (status, _) = web.api("POST", "/api/jobs/backup/run", None).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let (status, listed) = web
        .api("GET", "/api/runs?job=backup&status=queued&limit=1", None)
        .await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["runs"].as_array().unwrap().len(), 1);
    let (_, listed) = web.api("GET", "/api/runs?status=succeeded", None).await;
    assert_eq!(listed["runs"], json!([]));

    for (method, path, body, expected) in [
        ("POST", "/api/jobs/nope/run", None, StatusCode::NOT_FOUND),
        (
            "POST",
            "/api/jobs/backup/run",
            Some(json!([1, 2])),
            StatusCode::BAD_REQUEST,
        ),
        ("GET", "/api/runs/not-a-uuid", None, StatusCode::BAD_REQUEST),
        (
            "GET",
            "/api/runs/00000000-0000-4000-8000-000000000000",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "GET",
            "/api/runs?status=lost",
            None,
            StatusCode::BAD_REQUEST,
        ),
        ("GET", "/api/runs?limit=0", None, StatusCode::BAD_REQUEST),
        ("GET", "/api/runs?limit=many", None, StatusCode::BAD_REQUEST),
    ] {
        let (status, answer) = web.api(method, path, body).await;
        assert_eq!(status, expected, "{method} {path}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    assert_eq!(web.runs().await, 2);

    // Idempotency-Key: a repeat answers the first run.
    let keyed = || {
        Request::post("/api/jobs/backup/run")
            .header("authorization", format!("Bearer {API_TOKEN}"))
            .header("idempotency-key", "k-1")
            .body(Body::empty())
            .unwrap()
    };
    let (first_status, _, first) = web.send(keyed()).await;
    let (again_status, _, again) = web.send(keyed()).await;
    assert_eq!(
        (first_status, again_status),
        (StatusCode::ACCEPTED, StatusCode::OK)
    );
    assert_eq!(first["run_id"], again["run_id"]);
    assert_eq!(web.runs().await, 3);
}
}

crate::on_every_backend! {
async fn health_and_metrics_tell_what_works_and_what_ran(backend: Backend) {
    let Some(web) = Web::on(
        backend,
        "health_and_metrics_tell_what_works_and_what_ran",
        NAUTOBOT_HOOK,
    )
    .await
    else {
        return;
    };
    let (status, _, health) = web
        .send(Request::get("/healthz").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health, json!({"database": "ok", "rabbitmq": "ok"}));

    let (status, answer) = web
        .nautobot("nautobot", "", &nautobot_payload("sw1", "updated"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(
        web.nautobot("nope", "", &json!({})).await.0,
        StatusCode::NOT_FOUND
    );
    // Runs that finished a while ago (a worker's results): counted by job and status.
    let cluster = &web.cluster;
    let now = chrono::Utc::now();
    let ago = |ms: i64| cluster.time(now - chrono::Duration::milliseconds(ms));
    for status in ["succeeded", "succeeded", "failed"] {
        let mut run = crate::util::new_run(None, None);
        run.job_name = "backup".into();
        run.job = "test_echo".into();
        let id = cluster.store.insert_runs(&[run]).await.unwrap()[0];
        cluster
            .sql(&format!(
                "UPDATE job_runs SET status = '{status}', attempt = 1, created_at = {},
                    published_at = {}, started_at = {}, finished_at = {} WHERE id = {}",
                ago(500),
                ago(400),
                ago(300),
                ago(0),
                cluster.id(id)
            ))
            .await;
    }
    let wanted = [
        "jobschleuder_webhook_requests_total{code=\"202\",hook=\"nautobot\"} 1",
        "jobschleuder_webhook_requests_total{code=\"404\",hook=\"unknown\"} 1",
        "jobschleuder_runs_created_total{trigger=\"webhook\"} 1",
        "jobschleuder_runs_created_total{trigger=\"manual\"} 3",
        "jobschleuder_runs_finished_total{job=\"backup\",status=\"succeeded\"} 2",
        "jobschleuder_runs_finished_total{job=\"backup\",status=\"failed\"} 1",
        "jobschleuder_run_duration_seconds_count{job=\"backup\"} 3",
        "jobschleuder_firing_lag_seconds_count 3",
        "jobschleuder_broker_up 1",
        "jobschleuder_database_up 1",
    ];
    // The collector trails the database's clock by a moment: look until it has counted.
    let mut text = String::new();
    for _ in 0..100 {
        web.state.collect_metrics().await;
        let (status, headers, body) = web
            .send(Request::get("/metrics").body(Body::empty()).unwrap())
            .await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        text = body.as_str().unwrap().to_string();
        if wanted.iter().all(|line| text.contains(line)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for line in wanted {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    assert!(
        text.contains(&format!(
            "jobschleuder_queue_depth{{queue=\"{}\"}}",
            web.cluster.queue
        )),
        "{text}"
    );
    assert!(
        text.contains("jobschleuder_oldest_queued_run_age_seconds"),
        "{text}"
    );
    assert!(!text.contains(SECRET) && !text.contains(API_TOKEN));
}
}

#[tokio::test]
async fn with_rabbitmq_down_health_says_so_and_webhooks_create_nothing() {
    crate::needs_servers!("with_rabbitmq_down_health_says_so_and_webhooks_create_nothing");
    // Nothing listens on port 1: the broker is "down" for this listener only.
    let web = Web::with_rabbitmq("", NAUTOBOT_HOOK).await;
    let mut config = std::fs::read_to_string(&web.cluster.config).unwrap();
    config = config.replace("127.0.0.1:5672", "127.0.0.1:1");
    std::fs::write(&web.cluster.config, &config).unwrap();
    let url = web.cluster.db.url.clone();
    let config = Config::load_with_env(Some(&web.cluster.config), &|key| {
        (key == "JOBSCHLEUDER_DATABASE_URL").then(|| url.clone())
    })
    .unwrap();
    let store = Store::connect(&config.database).await.unwrap();
    let (_stop, shutdown) = Shutdown::manual();
    let state = listener::start(&config, store, shutdown).await;
    let down = Web {
        cluster: web.cluster,
        state: state.clone(),
        app: listener::router(state),
        _stop,
    };
    let (status, _, health) = down
        .send(Request::get("/healthz").body(Body::empty()).unwrap())
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{health}");
    assert_eq!(health["database"], "ok");
    assert_eq!(health["rabbitmq"], "unavailable");
    assert!(
        health["error"].as_str().unwrap().contains("RabbitMQ"),
        "{health}"
    );
    let (status, answer) = down
        .nautobot("nautobot", "", &nautobot_payload("sw1", "updated"))
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("RabbitMQ"),
        "{answer}"
    );
    assert_eq!(down.runs().await, 0);
}

#[test]
fn every_route_is_in_the_openapi_document_and_every_documented_route_exists() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("openapi.yaml at the repository's top");
    let document: serde_yaml::Value = serde_yaml::from_str(&text).expect("valid YAML");
    let paths = document["paths"].as_mapping().expect("a paths section");
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in paths {
        for (method, _) in item.as_mapping().unwrap() {
            let method = method.as_str().unwrap();
            if ["get", "post", "put", "patch", "delete"].contains(&method) {
                documented.push((method.to_string(), path.as_str().unwrap().to_string()));
            }
        }
    }
    documented.sort();
    let mut routes: Vec<(String, String)> = listener::routes()
        .into_iter()
        .map(|(method, path)| (method.as_str().to_ascii_lowercase(), path.to_string()))
        .collect();
    routes.sort();
    assert_eq!(routes, documented);
}

// ---- the real binary ----

/// Starts `listener --bind 127.0.0.1:0` and returns it with the port it listens on.
fn spawn_listener(cluster: &Cluster) -> (Process, u16) {
    let process = cluster.spawn("listener", &["listener", "--bind", "127.0.0.1:0"]);
    cluster.wait_for_log(&process, "listener ready");
    let log = process.log_text();
    let port = log
        .lines()
        .find(|l| l.contains("listener ready"))
        .and_then(|l| l.split("address=127.0.0.1:").nth(1))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no address in the log:\n{log}"));
    (process, port)
}

/// One HTTP/1.1 request over a plain socket; the status and the JSON body.
fn http(port: u16, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, Value) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (
        status,
        serde_json::from_str(body).unwrap_or(Value::String(body.to_string())),
    )
}

fn signed(payload: &Value) -> (Vec<u8>, Vec<(&'static str, String)>) {
    let body = serde_json::to_vec(payload).unwrap();
    let headers = vec![
        ("Content-Type", "application/json".to_string()),
        ("X-Hook-Signature", hmac512(SECRET, &body)),
    ];
    (body, headers)
}

crate::on_every_backend! {
    async fn a_webhook_for_a_device_is_run_by_a_real_worker_with_the_device_in_its_arguments(
        backend: Backend
    ) {
        let Some(cluster) = Cluster::on(
            backend,
            "a_webhook_for_a_device_is_run_by_a_real_worker_with_the_device_in_its_arguments",
            &format!("listener:\n{NAUTOBOT_HOOK}"),
        )
        .await
        else {
            return;
        };
        cluster.import(JOBS);
        let _worker = cluster.worker("w1", 2);
        let (mut listener, port) = spawn_listener(&cluster);
        let (body, headers) = signed(&nautobot_payload("sw-fra-01", "updated"));
        let (status, answer) = tokio::task::spawn_blocking(move || {
            http(port, "/hooks/nautobot?wait=30s", &headers, &body)
        })
        .await
        .unwrap();
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["status"], "succeeded", "{answer}");
        assert_eq!(answer["result"]["args"]["device"], "sw-fra-01", "{answer}");
        let ids = run_ids(&answer);
        let runs = cluster.runs().await;
        let rows: Vec<(String, String, Option<String>, String)> = runs
            .iter()
            .map(|r| {
                (
                    r.trigger.clone(),
                    r.status.clone(),
                    r.arguments["device"].as_str().map(str::to_string),
                    r.id.to_string(),
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![(
                "webhook".into(),
                "succeeded".into(),
                Some("sw-fra-01".into()),
                ids[0].clone()
            )]
        );
        let log = listener.log_text();
        assert!(
            log.contains("hook=nautobot") && log.contains(&ids[0]),
            "the request is logged:\n{log}"
        );
        assert!(!log.contains(SECRET), "the secret is not logged:\n{log}");
        listener.signal("TERM");
        let exit = listener
            .wait_exit(Duration::from_secs(20))
            .expect("the listener stops");
        assert_eq!(exit.code(), Some(0), "{}", listener.log_text());
    }
}

#[tokio::test]
async fn sighup_reloads_the_hooks_and_a_bad_file_keeps_the_old_ones() {
    crate::needs_servers!("sighup_reloads_the_hooks_and_a_bad_file_keeps_the_old_ones");
    let cluster = Cluster::new(&format!("listener:\n{NAUTOBOT_HOOK}")).await;
    cluster.import(JOBS);
    let (listener, port) = spawn_listener(&cluster);
    let original = std::fs::read_to_string(&cluster.config).unwrap();
    let post = move |hook: &'static str| {
        let (body, headers) = signed(&nautobot_payload("sw1", "updated"));
        tokio::task::spawn_blocking(move || {
            http(port, &format!("/hooks/{hook}"), &headers, &body).0
        })
    };
    assert_eq!(post("second").await.unwrap(), 404);
    std::fs::write(
        &cluster.config,
        format!("{original}    second:\n      job: backup\n      secret: s3cret\n"),
    )
    .unwrap();
    listener.signal("HUP");
    cluster.wait_for_log(&listener, "hooks reloaded");
    assert_eq!(post("second").await.unwrap(), 202);
    // A hook without authentication: the reload is refused, the hooks in force stay.
    std::fs::write(
        &cluster.config,
        format!("{original}    open:\n      job: backup\n"),
    )
    .unwrap();
    listener.signal("HUP");
    cluster.wait_for_log(&listener, "reload refused");
    assert!(listener.log_text().contains("listener.hooks.open"));
    assert_eq!(post("second").await.unwrap(), 202);
    assert_eq!(post("nautobot").await.unwrap(), 202);
}

#[tokio::test]
async fn sigterm_lets_requests_in_flight_finish_and_exits_zero() {
    crate::needs_servers!("sigterm_lets_requests_in_flight_finish_and_exits_zero");
    let cluster = Cluster::new(&format!("listener:\n{NAUTOBOT_HOOK}")).await;
    cluster.import(JOBS);
    let (mut listener, port) = spawn_listener(&cluster);
    // No worker: this request waits for its run until the listener stops.
    let (body, headers) = signed(&nautobot_payload("sw1", "updated"));
    let waiting = tokio::task::spawn_blocking(move || {
        http(port, "/hooks/nautobot?wait=60s", &headers, &body)
    });
    cluster
        .wait_until(
            "the run exists",
            Duration::from_secs(20),
            "SELECT count(*) = 1 FROM job_runs",
        )
        .await;
    listener.signal("TERM");
    let (status, answer) = waiting.await.unwrap();
    assert_eq!(status, 202, "answered, unfinished: {answer}");
    assert_eq!(answer["finished"], false);
    assert_eq!(answer["status"], "queued");
    let exit = listener
        .wait_exit(Duration::from_secs(20))
        .expect("the listener stops");
    assert_eq!(exit.code(), Some(0), "{}", listener.log_text());
}

#[tokio::test]
async fn a_request_after_its_windows_run_went_out_opens_a_new_window() {
    crate::needs_servers!("a_request_after_its_windows_run_went_out_opens_a_new_window");
    let web = Web::new(
        "  hooks:
    nautobot:
      job: backup
      secret: s3cret
      debounce: 1h
      debounce_key: \"{{ data.name }}\"
      arguments:
        event: \"{{ event }}\"
",
    )
    .await;
    let (_, first) = web
        .nautobot("nautobot", "", &nautobot_payload("sw1", "created"))
        .await;
    // The window's run is published while its key still reads as live (a request whose
    // transaction began just before the window ended).
    sqlx::query("UPDATE job_runs SET published_at = now()")
        .execute(&web.cluster.pool)
        .await
        .unwrap();
    let (status, second) = web
        .nautobot("nautobot", "", &nautobot_payload("sw1", "updated"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{second}");
    assert_ne!(
        run_ids(&second),
        run_ids(&first),
        "a run already sent cannot take new arguments"
    );
    let events: Vec<String> =
        sqlx::query_scalar("SELECT arguments->>'event' FROM job_runs ORDER BY created_at")
            .fetch_all(&web.cluster.pool)
            .await
            .unwrap();
    assert_eq!(
        events,
        ["created", "updated"],
        "no request's arguments are lost"
    );
    // The next request of the new window joins the new run.
    let (_, third) = web
        .nautobot("nautobot", "", &nautobot_payload("sw1", "deleted"))
        .await;
    assert_eq!(run_ids(&third), run_ids(&second));
}

#[tokio::test]
async fn templates_cannot_copy_credentials_into_arguments() {
    crate::needs_servers!("templates_cannot_copy_credentials_into_arguments");
    let web = Web::new(
        "  hooks:
    tokened:
      job: backup
      token: t0k3n
      arguments:
        copied: \"{{ headers.authorization }}\"
    signed:
      job: backup
      secret: s3cret
      arguments:
        copied: \"{{ headers.x-hook-signature }}\"
",
    )
    .await;
    let body = serde_json::to_vec(&json!({"data": {}})).unwrap();
    let (status, _, answer) = web
        .send(
            Request::post("/hooks/tokened")
                .header("content-type", "application/json")
                .header("authorization", "Bearer t0k3n")
                .body(Body::from(body.clone()))
                .unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    let (status, answer) = web.nautobot("signed", "", &json!({"data": {}})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
    assert_eq!(web.runs().await, 0);
}
