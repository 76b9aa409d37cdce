//! The pod watcher against a fake Kubernetes API server in this process.
//!
//! The server speaks the apiserver's wire format, built from `k8s-openapi`
//! types: `PodList` pages with `metadata.resourceVersion` and `continue`, and
//! watches as newline-delimited `WatchEvent` JSON over a chunked response,
//! with BOOKMARKs, and `ERROR` events carrying a 410 `Status` for a
//! resourceVersion older than its history. No cluster and no root needed.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    io,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use k8s_openapi::{
    api::core::v1::{Pod, PodIP, PodSpec, PodStatus},
    apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, Status, WatchEvent},
    List,
};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use vigil::kube_pods::{self, KubeStats, PodDirectory};

const NODE: &str = "node-a";
/// Every wait in a scenario gives up after this; a scenario takes ~2-4 s.
const WAIT: Duration = Duration::from_secs(8);
/// The whole test never runs longer than this.
const WHOLE_TEST: Duration = Duration::from_secs(15);

type Body = UnsyncBoxBody<Bytes, io::Error>;
type Chunk = Result<Frame<Bytes>, io::Error>;

/// One request as the server saw it, query decoded.
#[derive(Debug, Clone)]
struct Seen {
    query: BTreeMap<String, String>,
}

impl Seen {
    fn get(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }
    fn is_watch(&self) -> bool {
        self.get("watch") == Some("true")
    }
}

#[derive(Default)]
struct ApiState {
    /// Pods by name, as the apiserver stores them.
    pods: BTreeMap<String, Pod>,
    rv: u64,
    /// Watch events after `compacted_rv`, as JSON lines, for resumed watches.
    history: Vec<(u64, String)>,
    /// A watch from an older resourceVersion is answered 410 Gone.
    compacted_rv: u64,
    /// Items per list page: the apiserver may page whatever the client asks.
    page_size: usize,
    /// Continued list pages wait for `page_gate` before being served.
    hold_pages: bool,
    pages_held: usize,
    /// Answer 410 to the watch request itself (HTTP status) rather than as an
    /// ERROR event in a 200 watch stream.
    gone_as_http: bool,
    /// The open watch stream.
    watch: Option<mpsc::UnboundedSender<Chunk>>,
    requests: Vec<Seen>,
    /// Requests the server refused (wrong path or missing node selector).
    rejected: Vec<String>,
}

struct FakeApi {
    state: Mutex<ApiState>,
    page_gate: Notify,
}

impl FakeApi {
    fn new(pods: Vec<Pod>) -> Arc<FakeApi> {
        let mut state = ApiState {
            page_size: 500,
            ..ApiState::default()
        };
        for mut pod in pods {
            state.rv += 1;
            pod.metadata.resource_version = Some(state.rv.to_string());
            state.pods.insert(key_of(&pod), pod);
        }
        state.compacted_rv = state.rv;
        Arc::new(FakeApi {
            state: Mutex::new(state),
            page_gate: Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn serve(self: Arc<Self>) -> io::Result<String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let api = self.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| api.clone().handle(req));
                    // A watch broken on purpose ends here with an error.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(url)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let seen = Seen {
            query: parse_query(req.uri().query().unwrap_or("")),
        };
        self.state().requests.push(seen.clone());
        if req.uri().path() != "/api/v1/pods" {
            self.state().rejected.push(req.uri().to_string());
            return Ok(status_response(
                StatusCode::NOT_FOUND,
                "NotFound",
                "no such path",
            ));
        }
        if seen.get("fieldSelector") != Some(&format!("spec.nodeName={NODE}")) {
            // A real apiserver would send every pod of the cluster.
            self.state().rejected.push(req.uri().to_string());
            return Ok(status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "node selector missing",
            ));
        }
        if seen.is_watch() {
            Ok(self.watch(&seen))
        } else {
            Ok(self.list(&seen).await)
        }
    }

    async fn list(&self, seen: &Seen) -> Response<Body> {
        let start: usize = seen
            .get("continue")
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if start > 0 && self.state().hold_pages {
            self.state().pages_held += 1;
            self.page_gate.notified().await;
        }
        let state = self.state();
        let items: Vec<Pod> = state
            .pods
            .values()
            .skip(start)
            .take(state.page_size)
            .cloned()
            .collect();
        let next = start + items.len();
        let list = List::<Pod> {
            items,
            metadata: ListMeta {
                resource_version: Some(state.rv.to_string()),
                continue_: (next < state.pods.len()).then(|| next.to_string()),
                ..ListMeta::default()
            },
        };
        json_response(StatusCode::OK, &list)
    }

    fn watch(&self, seen: &Seen) -> Response<Body> {
        let mut state = self.state();
        let from: u64 = seen
            .get("resourceVersion")
            .and_then(|rv| rv.parse().ok())
            .unwrap_or(0);
        let (tx, rx) = mpsc::unbounded_channel::<Chunk>();
        if from < state.compacted_rv {
            let gone = Status {
                code: Some(410),
                reason: Some("Expired".into()),
                status: Some("Failure".into()),
                message: Some(format!(
                    "too old resource version: {from} ({})",
                    state.compacted_rv
                )),
                ..Status::default()
            };
            if state.gone_as_http {
                return json_response(StatusCode::GONE, &gone);
            }
            // What the apiserver's watch cache does: 200, one ERROR event, end.
            let event = json_line(&WatchEvent::<Pod>::ErrorStatus(gone));
            let _ = tx.send(Ok(Frame::data(Bytes::from(event))));
            drop(tx);
            return stream_response(rx);
        }
        for (rv, event) in &state.history {
            if *rv > from {
                let _ = tx.send(Ok(Frame::data(Bytes::from(event.clone()))));
            }
        }
        // The apiserver's BOOKMARK: a Pod with only metadata.resourceVersion.
        // (k8s-openapi's own WatchEvent::Bookmark serializer leaves out
        // apiVersion/kind, which the apiserver does send and kube requires.)
        let bookmark = Pod {
            metadata: ObjectMeta {
                resource_version: Some(state.rv.to_string()),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        };
        let bookmark = serde_json::json!({ "type": "BOOKMARK", "object": bookmark });
        let _ = tx.send(Ok(Frame::data(Bytes::from(format!("{bookmark}\n")))));
        state.watch = Some(tx);
        stream_response(rx)
    }

    /// A change in the cluster: stored, kept for resumed watches and sent to
    /// the open watch if there is one.
    fn change(&self, added: Option<Pod>, deleted: Option<&str>) {
        let mut state = self.state();
        let mut events = Vec::new();
        if let Some(mut pod) = added {
            state.rv += 1;
            pod.metadata.resource_version = Some(state.rv.to_string());
            state.pods.insert(key_of(&pod), pod.clone());
            events.push((state.rv, WatchEvent::Added(pod)));
        }
        if let Some(name) = deleted {
            state.rv += 1;
            let rv = state.rv;
            let key = state
                .pods
                .iter()
                .find(|(_, p)| p.metadata.name.as_deref() == Some(name))
                .map(|(k, _)| k.clone())
                .unwrap_or_else(|| panic!("no pod {name}"));
            let mut pod = state
                .pods
                .remove(&key)
                .unwrap_or_else(|| panic!("no pod {name}"));
            pod.metadata.resource_version = Some(rv.to_string());
            events.push((rv, WatchEvent::Deleted(pod)));
        }
        for (rv, event) in events {
            let text = json_line(&event);
            if let Some(watch) = &state.watch {
                let _ = watch.send(Ok(Frame::data(Bytes::from(text.clone()))));
            }
            state.history.push((rv, text));
        }
    }

    /// Stops sending to the open watch without ending it yet.
    fn detach_watch(&self) -> mpsc::UnboundedSender<Chunk> {
        self.state()
            .watch
            .take()
            .unwrap_or_else(|| panic!("no watch open"))
    }

    fn watch_open(&self) -> bool {
        self.state().watch.as_ref().is_some_and(|w| !w.is_closed())
    }

    /// Forgets the event history: watches from before now get 410 Gone.
    fn compact(&self) {
        let mut state = self.state();
        state.history.clear();
        state.compacted_rv = state.rv;
    }

    fn requests(&self) -> Vec<Seen> {
        self.state().requests.clone()
    }
}

/// The apiserver's storage key, which orders lists: namespace/name.
fn key_of(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn json_line<T: serde::Serialize>(value: &T) -> String {
    let text = serde_json::to_string(value).unwrap_or_else(|e| panic!("serialize: {e}"));
    text + "\n"
}

fn json_response<T: serde::Serialize>(code: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut res = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *res.status_mut() = code;
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    res
}

fn status_response(code: StatusCode, reason: &str, message: &str) -> Response<Body> {
    let status = Status {
        code: Some(i32::from(code.as_u16())),
        reason: Some(reason.into()),
        status: Some("Failure".into()),
        message: Some(message.into()),
        ..Status::default()
    };
    json_response(code, &status)
}

fn stream_response(mut rx: mpsc::UnboundedReceiver<Chunk>) -> Response<Body> {
    let chunks = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut res = Response::new(StreamBody::new(chunks).boxed_unsync());
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    res
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn pod(n: u8, host_network: bool) -> Pod {
    let ip = if host_network {
        "192.168.50.2".to_string()
    } else {
        format!("10.244.0.{n}")
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("pod{n}")),
            // Even pods sort first (apps/...): the relist's first page is pod4.
            namespace: Some(
                if n.is_multiple_of(2) {
                    "apps"
                } else {
                    "default"
                }
                .into(),
            ),
            uid: Some(format!("00000000-0000-0000-0000-00000000000{n}")),
            labels: Some(BTreeMap::from([("app".to_string(), format!("app{n}"))])),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(NODE.into()),
            host_network: host_network.then_some(true),
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.clone()),
            pod_ips: Some(vec![PodIP { ip }]),
            ..PodStatus::default()
        }),
    }
}

fn uid(n: u8) -> String {
    format!("00000000-0000-0000-0000-00000000000{n}")
}

fn names(dir: &RwLock<PodDirectory>) -> Vec<String> {
    let dir = dir.read().unwrap_or_else(PoisonError::into_inner);
    let mut names: Vec<String> = (1..=9)
        .filter_map(|n| dir.by_uid(&uid(n)).map(|p| p.name.clone()))
        .collect();
    assert_eq!(names.len(), dir.len(), "only pods pod1..pod9 are expected");
    names.sort();
    names
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_pods(dir: &RwLock<PodDirectory>, want: &[&str]) {
    wait_until(&format!("the directory holds {want:?}"), || {
        names(dir) == want
    })
    .await;
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Outage {
    /// The connection dies mid-watch; history is compacted meanwhile, so the
    /// resumed watch gets a 410 ERROR event and the watcher relists.
    BrokenThenGoneEvent,
    /// Same, but the apiserver answers the resumed watch with HTTP 410.
    BrokenThenGoneHttp,
    /// The watch ends cleanly (timeoutSeconds); history is kept, so the watch
    /// resumes from its resourceVersion and replays what it missed.
    ClosedThenResumed,
}

struct Running {
    api: Arc<FakeApi>,
    dir: Arc<RwLock<PodDirectory>>,
    stats: Arc<KubeStats>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

async fn start() -> Running {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("vigil=debug,kube_runtime=debug,kube_client=info")
        .try_init();
    // Initial state: pod1 and the hostNetwork pod2 on this node.
    let api = FakeApi::new(vec![pod(1, false), pod(2, true)]);
    let url = api
        .clone()
        .serve()
        .await
        .unwrap_or_else(|e| panic!("serve: {e}"));
    let config = kube::Config::new(url.parse().unwrap_or_else(|e| panic!("url {url}: {e}")));
    let client = kube::Client::try_from(config).unwrap_or_else(|e| panic!("client: {e}"));
    let dir = Arc::new(RwLock::new(PodDirectory::new(16)));
    let stats = Arc::new(KubeStats::default());
    let stop = CancellationToken::new();
    let task = kube_pods::spawn(
        client,
        NODE.to_string(),
        dir.clone(),
        stats.clone(),
        stop.clone(),
    );
    Running {
        api,
        dir,
        stats,
        stop,
        task,
    }
}

async fn scenario(outage: Outage) {
    let Running {
        api,
        dir,
        stats,
        stop,
        task,
    } = start().await;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);

    // 1. The initial list: both pods, looked up by uid and IP.
    wait_for_pods(&dir, &["pod1", "pod2"]).await;
    assert!(stats.synced.load(std::sync::atomic::Ordering::Relaxed));
    assert_eq!(load(&stats.pods), 2);
    {
        let d = dir.read().unwrap_or_else(PoisonError::into_inner);
        let p1 = d.by_uid(&uid(1)).unwrap_or_else(|| panic!("pod1"));
        assert_eq!(p1.namespace, "default");
        assert_eq!(p1.labels.get("app").map(String::as_str), Some("app1"));
        let ip1: IpAddr = "10.244.0.1".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.by_ip(ip1).map(|p| p.name.as_str()), Some("pod1"));
        // pod2 is hostNetwork: known by uid, never by the node's IP.
        assert!(d.by_uid(&uid(2)).is_some_and(|p| p.host_network));
        let node_ip: IpAddr = "192.168.50.2".parse().unwrap_or_else(|e| panic!("{e}"));
        assert!(d.by_ip(node_ip).is_none());
    }

    // 2. Live watch events: ADDED pod3, then DELETED pod1.
    wait_until("the watch is open", || api.watch_open()).await;
    api.change(Some(pod(3, false)), None);
    wait_for_pods(&dir, &["pod1", "pod2", "pod3"]).await;
    api.change(None, Some("pod1"));
    wait_for_pods(&dir, &["pod2", "pod3"]).await;
    let last_rv_seen = api.state().rv;
    assert_eq!(load(&stats.relists), 0);

    // 3. The watch goes away; while the agent is disconnected pod2 is
    //    deleted and pod4 added. The server stops feeding the watch first, so
    //    these changes reach the agent only through the resume or the relist.
    let open = api.detach_watch();
    {
        let mut state = api.state();
        state.page_size = 1;
        state.hold_pages = outage != Outage::ClosedThenResumed;
        state.gone_as_http = outage == Outage::BrokenThenGoneHttp;
    }
    api.change(Some(pod(4, false)), Some("pod2"));
    if outage == Outage::ClosedThenResumed {
        // The response ends cleanly, as at the watch's timeoutSeconds.
        drop(open);
    } else {
        // The history is compacted meanwhile, and the connection dies
        // mid-stream (no terminating chunk).
        api.compact();
        let _ = open.send(Err(io::Error::other("connection reset by fake apiserver")));
        // The relist is paged (one pod a page) and its second page is held:
        // pod4 has arrived on the first page, yet the directory must still be
        // the old one, never half-listed.
        wait_until("the relist waits for its second page", || {
            api.state().pages_held > 0
        })
        .await;
        assert_eq!(names(&dir), ["pod2", "pod3"]);
        api.page_gate.notify_one();
    }

    // 4. Recovery: exactly pod3 and pod4.
    wait_for_pods(&dir, &["pod3", "pod4"]).await;
    assert_eq!(load(&stats.pods), 2);
    {
        let d = dir.read().unwrap_or_else(PoisonError::into_inner);
        let ip4: IpAddr = "10.244.0.4".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(d.by_ip(ip4).map(|p| p.name.as_str()), Some("pod4"));
        assert_eq!(
            d.by_uid(&uid(4)).map(|p| p.namespace.as_str()),
            Some("apps")
        );
    }
    match outage {
        Outage::ClosedThenResumed => {
            assert_eq!(load(&stats.relists), 0, "a resumable watch needs no relist");
            assert_eq!(load(&stats.watch_errors), 0);
        }
        _ => {
            assert_eq!(load(&stats.relists), 1, "the broken watch led to a relist");
            assert!(load(&stats.watch_errors) >= 1, "the 410 is counted");
        }
    }
    wait_until("the watch is open again", || api.watch_open()).await;

    // The requests: all node-scoped; watches carry watch=true, bookmarks and
    // a resourceVersion; the first resumed watch started where the broken
    // one stopped; the relist was paged.
    let requests = api.requests();
    assert!(
        api.state().rejected.is_empty(),
        "{:?}",
        api.state().rejected
    );
    for r in &requests {
        assert_eq!(
            r.get("fieldSelector"),
            Some(format!("spec.nodeName={NODE}").as_str()),
            "{r:?}"
        );
    }
    let watches: Vec<&Seen> = requests.iter().filter(|r| r.is_watch()).collect();
    assert!(watches.len() >= 2, "{requests:?}");
    for w in &watches {
        assert!(
            w.get("resourceVersion").is_some_and(|rv| !rv.is_empty()),
            "{w:?}"
        );
        assert_eq!(w.get("allowWatchBookmarks"), Some("true"), "{w:?}");
    }
    assert_eq!(
        watches[1].get("resourceVersion"),
        Some(last_rv_seen.to_string().as_str()),
        "the watch resumed from the last resourceVersion it saw"
    );
    let lists = requests.iter().filter(|r| !r.is_watch()).count();
    match outage {
        Outage::ClosedThenResumed => assert_eq!(lists, 1, "{requests:?}"),
        // The initial list, then the relist's two pages.
        _ => assert_eq!(lists, 3, "{requests:?}"),
    }

    // 5. Stop ends the task promptly.
    stop.cancel();
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap_or_else(|_| panic!("watcher task did not stop"))
        .unwrap_or_else(|e| panic!("watcher task failed: {e}"));
}

async fn bounded(outage: Outage) {
    tokio::time::timeout(WHOLE_TEST, scenario(outage))
        .await
        .unwrap_or_else(|_| panic!("{outage:?} scenario took longer than {WHOLE_TEST:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_watch_relists_when_history_is_gone() {
    bounded(Outage::BrokenThenGoneEvent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_watch_relists_when_the_watch_request_is_refused_with_410() {
    bounded(Outage::BrokenThenGoneHttp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_watch_resumes_from_its_resource_version() {
    bounded(Outage::ClosedThenResumed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_node_name_watches_nothing() {
    let api = FakeApi::new(vec![pod(1, false)]);
    let url = api
        .clone()
        .serve()
        .await
        .unwrap_or_else(|e| panic!("serve: {e}"));
    let config = kube::Config::new(url.parse().unwrap_or_else(|e| panic!("url {url}: {e}")));
    let client = kube::Client::try_from(config).unwrap_or_else(|e| panic!("client: {e}"));
    let dir = Arc::new(RwLock::new(PodDirectory::default()));
    let task = kube_pods::spawn(
        client,
        String::new(),
        dir.clone(),
        Arc::new(KubeStats::default()),
        CancellationToken::new(),
    );
    tokio::time::timeout(WAIT, task)
        .await
        .unwrap_or_else(|_| panic!("task without a node name did not return"))
        .unwrap_or_else(|e| panic!("task failed: {e}"));
    assert!(api.requests().is_empty(), "{:?}", api.requests());
    assert!(dir
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .is_empty());
}
