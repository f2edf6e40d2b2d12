//! A real HTTP receiver on loopback for alert webhooks (a `wiremock` server): records every
//! request and can answer the first ones with 500, so that retries are exercised against a real
//! socket.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Respond, ResponseTemplate};

#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub content_type: Option<String>,
    pub body: String,
    /// The status this receiver answered with.
    pub answered: u16,
}

pub struct WebhookReceiver {
    pub url: String,
    requests: Arc<Mutex<Vec<Request>>>,
    /// Serves until dropped.
    _server: MockServer,
}

/// Answers 500 to the first `fail_first` requests, then 200, and records each with its answer.
struct Recorder {
    fail_first: usize,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Respond for Recorder {
    fn respond(&self, req: &wiremock::Request) -> ResponseTemplate {
        let mut log = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let answered = if log.len() < self.fail_first {
            500
        } else {
            200
        };
        log.push(Request {
            method: req.method.to_string(),
            path: req.url.path().to_string(),
            content_type: req
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: String::from_utf8_lossy(&req.body).into_owned(),
            answered,
        });
        let body = if answered == 200 { "ok" } else { "try again" };
        ResponseTemplate::new(answered).set_body_string(body)
    }
}

impl WebhookReceiver {
    /// Answers the first `fail_first` requests with 500, then 200.
    pub async fn start(fail_first: usize) -> Result<Self> {
        // Not from wiremock's pool: a fresh port per receiver, so no request of an earlier test
        // can reach this one.
        let server = MockServer::builder().start().await;
        let requests = Arc::new(Mutex::new(Vec::new()));
        Mock::given(any())
            .respond_with(Recorder {
                fail_first,
                requests: requests.clone(),
            })
            .mount(&server)
            .await;
        Ok(WebhookReceiver {
            url: format!("{}/hooks/T000/B000/secret-token", server.uri()),
            requests,
            _server: server,
        })
    }

    pub fn requests(&self) -> Vec<Request> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Bodies of the requests answered 200.
    pub fn delivered(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.answered == 200)
            .map(|r| r.body)
            .collect()
    }
}
