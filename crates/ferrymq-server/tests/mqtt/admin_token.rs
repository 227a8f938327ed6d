//! `[admin] token` (issue 12, item 6): every admin route but `/health` (and `/ready`) needs
//! `Authorization: Bearer <token>`; without it or with a wrong one the answer is 401, with it
//! the route answers as before.

use serde_json::json;

use crate::common::*;

const TOKEN: &str = "t0ken-for-the-admin-api";

async fn server_with_token() -> ferrymq_server::Server {
    let mut config = test_config();
    config.admin.token = Some(TOKEN.into());
    start_with(config).await
}

#[tokio::test]
async fn admin_routes_answer_401_without_the_token_or_with_a_wrong_one_and_200_with_it() {
    let server = server_with_token().await;
    for (method, path) in [
        ("GET", "/metrics"),
        ("GET", "/api/v1/alarms"),
        ("GET", "/api/v1/queues"),
        ("GET", "/api/v1/queues/nope/dlq"),
        ("GET", "/no-such-route"),
    ] {
        let (status, body) = api(&server, method, path, None).await;
        assert_eq!(status, 401, "{method} {path} without a token: {body}");
        assert!(body["error"].as_str().unwrap().contains("token"), "{body}");
        for wrong in [
            "wrong",
            "t0ken-for-the-admin-ap",
            "t0ken-for-the-admin-apii",
        ] {
            let (status, _) = api_with_token(&server, Some(wrong), method, path, None).await;
            assert_eq!(status, 401, "{method} {path} with token {wrong:?}");
        }
    }
    let (status, body) = api_with_token(&server, Some(TOKEN), "GET", "/api/v1/queues", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = api_with_token(&server, Some(TOKEN), "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(body.as_str().unwrap().contains("ferrymq_connections_open"));
    // A write goes through with the token, and not without.
    let def = json!({ "name": "jobs", "filter": "jobs/#" });
    let (status, _) = api(&server, "POST", "/api/v1/queues", Some(def.clone())).await;
    assert_eq!(status, 401);
    let (status, body) =
        api_with_token(&server, Some(TOKEN), "POST", "/api/v1/queues", Some(def)).await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = api_with_token(&server, Some(TOKEN), "GET", "/no-such-route", None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn health_stays_open_with_a_token() {
    let server = server_with_token().await;
    let (status, body) = http_get(&server, "/health").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"status\":\"ok\""), "{body}");
}

#[tokio::test]
async fn the_token_can_come_from_a_file() {
    let dir = fresh_data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("admin.token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let mut config = test_config();
    config.admin.token_file = Some(file);
    let server = start_with(config).await;
    let (status, _) = api(&server, "GET", "/api/v1/queues", None).await;
    assert_eq!(status, 401);
    let (status, _) = api_with_token(&server, Some(TOKEN), "GET", "/api/v1/queues", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn without_a_token_the_admin_api_must_be_on_loopback() {
    // Refused by validation, before anything is bound.
    let mut config = test_config();
    config.listeners.http = "0.0.0.0:0".parse().unwrap();
    let err = ferrymq_server::Server::start(config.clone())
        .await
        .err()
        .expect("refused to start");
    let message = err.to_string();
    assert!(message.contains("listeners.http"), "{message}");
    assert!(message.contains("token"), "{message}");
    // With a token it is allowed (only validated here: tests bind loopback only).
    config.admin.token = Some(TOKEN.into());
    config
        .validate()
        .expect("a non-loopback admin API with a token");
}
