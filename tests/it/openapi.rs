//! The OpenAPI document at `/api/openapi.json` against the real server: every answer a job
//! runner can get (success, 400, 401, 404, 409, 413, 429) must be documented for its path and
//! method, and its JSON body must validate against the schema the document names for it.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{TOKEN, TestApp, WAIT, behind_local_proxy};

/// A job id no job has.
const UNKNOWN: &str = "AAAAAAAAAAAAAAAAAAAAAA";

/// The document, and what has been checked against it so far.
struct Contract {
    document: Value,
    /// (path template, method, status) of every answer checked.
    seen: BTreeSet<(String, String, u16)>,
}

impl Contract {
    async fn fetch(app: &TestApp) -> Self {
        let answer = app.get("/api/openapi.json").await;
        assert_eq!(answer.status(), 200, "the document is public");
        let document: Value = answer.json().await.expect("the document is JSON");
        let version = document["openapi"].as_str().unwrap_or_default();
        assert!(version.starts_with("3.1."), "OpenAPI 3.1, not {version:?}");
        Self {
            document,
            seen: BTreeSet::new(),
        }
    }

    /// `schema` as a document of its own, with the OpenAPI document's components beside it so
    /// that its `#/components/schemas/…` references resolve.
    ///
    /// Stricter than the document on two counts, so that drift shows: `format`s (the timestamps'
    /// `date-time`) are checked, which JSON Schema 2020-12 leaves off by default, and an object
    /// may hold no property its schema does not name.
    fn validator(&self, schema: &Value) -> jsonschema::Validator {
        let mut rooted = schema.clone();
        rooted["components"] = self.document["components"].clone();
        close_objects(&mut rooted);
        jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&rooted)
            .unwrap_or_else(|e| panic!("not a valid JSON Schema ({e}): {schema}"))
    }

    /// The operation documented for `method` on `template`.
    fn operation(&self, template: &str, method: &Method) -> &Value {
        let operation = &self.document["paths"][template][method.as_str().to_lowercase()];
        assert!(
            operation.is_object(),
            "{method} {template} is not in the document"
        );
        operation
    }

    /// Checks that `body`, which the test is about to send, is what the document asks for.
    fn check_request(&self, template: &str, method: &Method, body: &Value) {
        let schema = &self.operation(template, method)["requestBody"]["content"]["application/json"]
            ["schema"];
        assert!(
            schema.is_object(),
            "{method} {template} documents no JSON body"
        );
        let validator = self.validator(schema);
        let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{method} {template}: the document refuses {body}: {errors:?}"
        );
    }

    /// Checks an answer against the document: its status is documented for the operation, and
    /// its body validates against that status's JSON schema. Returns the status and body.
    async fn check(
        &mut self,
        template: &str,
        method: &Method,
        answer: reqwest::Response,
    ) -> (u16, Value) {
        let status = answer.status().as_u16();
        let body: Value = answer
            .json()
            .await
            .unwrap_or_else(|e| panic!("{method} {template} answered {status} without JSON: {e}"));
        let documented = &self.operation(template, method)["responses"][status.to_string()];
        assert!(
            documented.is_object(),
            "{method} {template} answered {status}, which the document does not list: {body}"
        );
        let schema = &documented["content"]["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{method} {template} {status}: no JSON schema documented"
        );
        let errors: Vec<String> = self
            .validator(schema)
            .iter_errors(&body)
            .map(|e| format!("{e} at {}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{method} {template} {status}: the body does not match the document: {errors:?}\n{body}"
        );
        self.seen
            .insert((template.to_owned(), method.to_string(), status));
        (status, body)
    }
}

/// Who sends a request: the client address (the app trusts 127.0.0.1 as its proxy) and the
/// bearer token, if any.
type Sender<'a> = (&'a str, Option<&'a str>);
const RUNNER: Sender = ("198.51.100.1", Some(TOKEN));
const ANYONE: Sender = ("198.51.100.1", None);
const GUESSER: &str = "203.0.113.7";

/// A request to `template` with `{id}` filled in.
struct Call<'a> {
    method: Method,
    template: &'a str,
    id: &'a str,
    body: Option<String>,
}

impl<'a> Call<'a> {
    fn get(template: &'a str, id: &'a str) -> Self {
        Self {
            method: Method::GET,
            template,
            id,
            body: None,
        }
    }

    fn post(template: &'a str, id: &'a str) -> Self {
        Self {
            method: Method::POST,
            template,
            id,
            body: None,
        }
    }

    /// With `body` as JSON, which the document must accept as the operation's request body.
    fn valid(mut self, contract: &Contract, body: Value) -> Self {
        contract.check_request(self.template, &self.method, &body);
        self.body = Some(body.to_string());
        self
    }

    /// With `body` as it is, whatever the document says of it.
    fn raw(mut self, body: impl Into<String>) -> Self {
        self.body = Some(body.into());
        self
    }
}

impl Contract {
    /// Sends `call` to `app` as `sender` and checks the answer against the document.
    async fn call(&mut self, app: &TestApp, sender: Sender<'_>, call: Call<'_>) -> (u16, Value) {
        let (from, token) = sender;
        let path = call.template.replace("{id}", call.id);
        let mut request = app
            .client
            .request(call.method.clone(), app.url(&path))
            .header("X-Forwarded-For", from);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = call.body {
            request = request
                .header("Content-Type", "application/json")
                .body(body);
        }
        let answer = request.send().await.expect("API request");
        self.check(call.template, &call.method, answer).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_of_the_api_matches_its_openapi_document() {
    let app = TestApp::spawn_with(behind_local_proxy).await;
    let mut contract = Contract::fetch(&app).await;
    let (jobs, job) = ("/api/jobs", "/api/jobs/{id}");
    let progress = "/api/jobs/{id}/progress";
    let (complete, fail) = ("/api/jobs/{id}/complete", "/api/jobs/{id}/fail");

    // Successes, each body first checked against the document's request schema.
    let create = Call::post(jobs, "").valid(
        &contract,
        json!({ "moveUrl": "/orders/42?x=1", "deadlineSecs": 600 }),
    );
    let (status, created) = contract.call(&app, RUNNER, create).await;
    assert_eq!(status, 201);
    let id = created["id"].as_str().expect("an id").to_owned();
    assert_eq!(created["waitUrl"], format!("/jobs/{id}"));
    let report = json!({ "percent": 40, "message": "Rendering page 3 of 7" });
    let reported = Call::post(progress, &id).valid(&contract, report.clone());
    assert_eq!(contract.call(&app, RUNNER, reported).await.0, 200);
    // Once the report is stored, the job's `progress` object is checked too.
    let stored = || async { app.job(&id).await["progress"].is_object() };
    assert!(crate::support::eventually(WAIT, stored).await);
    let (status, shown) = contract.call(&app, ANYONE, Call::get(job, &id)).await;
    assert_eq!((status, &shown["status"]), (200, &json!("pending")));
    let (status, completed) = contract.call(&app, RUNNER, Call::post(complete, &id)).await;
    assert_eq!(
        (status, &completed["moveUrl"]),
        (200, &json!("/orders/42?x=1"))
    );
    let failing = app.job_id().await;
    let why = json!({ "message": "The bank declined the payment" });
    let failed = Call::post(fail, &failing).valid(&contract, why);
    let (status, failed) = contract.call(&app, RUNNER, failed).await;
    assert_eq!((status, &failed["status"]), (200, &json!("failed")));

    // A batch: each result checked against the document, a done one and a refused one.
    let batch = "/api/jobs/batch";
    let batched = app.job_id().await;
    let operations = json!({ "operations": [
        { "op": "progress", "id": batched, "percent": 10, "message": "Starting" },
        { "op": "complete", "id": batched, "moveUrl": "/orders/43" },
        { "op": "fail", "id": UNKNOWN, "message": "gone" },
    ] });
    let call = Call::post(batch, "").valid(&contract, operations);
    let (status, answer) = contract.call(&app, RUNNER, call).await;
    let statuses: Vec<&Value> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["status"])
        .collect();
    assert_eq!(
        (status, statuses),
        (200, vec![&json!(200), &json!(200), &json!(404)])
    );
    let empty = Call::post(batch, "").raw(json!({ "operations": [] }).to_string());
    assert_eq!(contract.call(&app, RUNNER, empty).await.0, 400);
    let many: Vec<Value> = (0..1001)
        .map(|_| json!({ "op": "complete", "id": UNKNOWN }))
        .collect();
    let many = Call::post(batch, "").raw(json!({ "operations": many }).to_string());
    assert_eq!(contract.call(&app, RUNNER, many).await.0, 413);

    // 400: a malformed id, a refused moveUrl, a body that is not JSON, a percent out of range.
    let malformed = Call::get(job, "not-an-id");
    let evil = Call::post(jobs, "").raw(json!({ "moveUrl": "https://evil.example" }).to_string());
    let not_json = Call::post(complete, &id).raw("moveUrl=/x");
    let too_far = Call::post(progress, &failing).raw(r#"{"percent": 101}"#);
    for call in [malformed, evil, not_json, too_far] {
        assert_eq!(contract.call(&app, RUNNER, call).await.0, 400);
    }

    // 404 on every operation that names a job; 409 for what an end state does not allow.
    for template in [job, progress, complete, fail] {
        let method = if template == job {
            Call::get
        } else {
            Call::post
        };
        assert_eq!(
            contract
                .call(&app, RUNNER, method(template, UNKNOWN))
                .await
                .0,
            404
        );
    }
    for (template, ended) in [(fail, &id), (progress, &id), (complete, &failing)] {
        let call = Call::post(template, ended).raw(report.to_string());
        assert_eq!(contract.call(&app, RUNNER, call).await.0, 409);
    }

    // 413: a body over the limit.
    let huge = Call::post(fail, &id).raw(json!({ "message": "x".repeat(20_000) }).to_string());
    assert_eq!(contract.call(&app, RUNNER, huge).await.0, 413);

    // 401 without a token and with wrong ones on every protected operation, until 429.
    let protected = [jobs, progress, complete, fail, batch];
    for template in protected {
        let call = Call::post(template, &id);
        assert_eq!(contract.call(&app, (GUESSER, None), call).await.0, 401);
    }
    let mut status = 401;
    for guess in 0..10 {
        let wrong = format!("wrong-token-guess-{guess}");
        let call = Call::post(protected[guess % protected.len()], &id);
        status = contract.call(&app, (GUESSER, Some(&wrong)), call).await.0;
        if status != 401 {
            break;
        }
    }
    assert_eq!(status, 429, "wrong tokens from one address are throttled");
    for template in protected {
        let call = Call::post(template, &id);
        assert_eq!(
            contract.call(&app, (GUESSER, Some(TOKEN)), call).await.0,
            429
        );
    }

    // Every operation in the document was exercised, and nothing else is in it.
    let documented: BTreeSet<(String, String)> = contract.document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, operations)| {
            operations
                .as_object()
                .expect("operations")
                .keys()
                .map(|method| (path.clone(), method.to_uppercase()))
        })
        .collect();
    let exercised: BTreeSet<(String, String)> = contract
        .seen
        .iter()
        .map(|(path, method, _)| (path.clone(), method.clone()))
        .collect();
    assert_eq!(documented, exercised);
    let statuses: BTreeSet<u16> = contract.seen.iter().map(|(_, _, s)| *s).collect();
    assert_eq!(
        statuses,
        BTreeSet::from([200, 201, 400, 401, 404, 409, 413, 429])
    );
}

#[tokio::test]
async fn the_document_names_the_bearer_scheme_on_exactly_the_token_protected_operations() {
    let app = TestApp::spawn().await;
    let document = Contract::fetch(&app).await.document;
    let scheme = &document["components"]["securitySchemes"]["bearer"];
    assert_eq!(
        (&scheme["type"], &scheme["scheme"]),
        (&json!("http"), &json!("bearer"))
    );
    let paths = &document["paths"];
    for (path, method) in [
        ("/api/jobs", "post"),
        ("/api/jobs/{id}/progress", "post"),
        ("/api/jobs/{id}/complete", "post"),
        ("/api/jobs/{id}/fail", "post"),
        ("/api/jobs/batch", "post"),
    ] {
        assert_eq!(
            paths[path][method]["security"],
            json!([{ "bearer": [] }]),
            "{method} {path}"
        );
    }
    assert!(
        paths["/api/jobs/{id}"]["get"].get("security").is_none(),
        "anyone holding the id may read a job"
    );
}

/// Every object schema that lists its properties allows no others.
fn close_objects(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.contains_key("properties") && !map.contains_key("additionalProperties") {
                map.insert("additionalProperties".into(), Value::Bool(false));
            }
            map.values_mut().for_each(close_objects);
        }
        Value::Array(items) => items.iter_mut().for_each(close_objects),
        _ => {}
    }
}
