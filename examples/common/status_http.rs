//! The status endpoint: `GET /status` answers the last published status as JSON. A few lines of
//! HTTP/1.1 (one request per connection, then close) rather than a web framework: the binaries
//! only ever serve this one document, and the load test only ever reads it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The document served, shared with the publisher.
pub type Latest = Arc<Mutex<Option<Arc<Vec<u8>>>>>;

/// Longest request head read; anything longer is not a status request.
const MAX_REQUEST: usize = 8 * 1024;
/// Longest a client may take to send its request and read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send its request.
const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Clients served at once.
const MAX_CLIENTS: usize = 32;
/// Largest status document the reader accepts (a node with 100,000 spaces writes about 30 MB).
const MAX_DOCUMENT: u64 = 512 * 1024 * 1024;

pub async fn serve(listener: TcpListener, latest: Latest) {
    // Clients served at once: idle connections must not take the file descriptors the WAL needs.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        match listener.accept().await {
            Ok((mut sock, _)) => {
                let latest = latest.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(CLIENT_TIMEOUT, answer(&mut sock, &latest)).await;
                    drop(slot);
                });
            }
            // Out of file descriptors, most likely: wait rather than spin.
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn answer(sock: &mut TcpStream, latest: &Latest) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = sock.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_REQUEST {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(HEAD_TIMEOUT, read_head).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
    let line = String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or_default()).into_owned();
    let mut words = line.split_whitespace();
    let path = match (words.next(), words.next()) {
        (Some("GET"), Some(p)) => Some(p),
        _ => None,
    };
    let document = latest.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (status, kind, body): (&str, &str, Arc<Vec<u8>>) = match (path, document) {
        (Some("/status"), Some(doc)) => ("200 OK", "application/json", doc),
        (Some("/status"), None) => ("503 Service Unavailable", "text/plain", Arc::new(b"no status yet\n".to_vec())),
        _ => ("404 Not Found", "text/plain", Arc::new(b"GET /status\n".to_vec())),
    };
    let header = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    sock.write_all(header.as_bytes()).await?;
    sock.write_all(&body).await?;
    sock.shutdown().await
}

/// Why a status could not be read.
#[derive(Debug)]
pub struct FetchError {
    pub message: String,
    /// Worth trying again: the node may not be up yet (no connection, no status yet, a
    /// timeout); otherwise the address is not a status endpoint.
    pub retry: bool,
}

/// Reads the status document at `url` (`http://HOST:PORT`, or with a path; `/status` by default).
pub async fn fetch(url: &str) -> Result<serde_json::Value, FetchError> {
    let fatal = |message: String| FetchError { message, retry: false };
    let retry = |message: String| FetchError { message, retry: true };
    let rest = url.strip_prefix("http://").ok_or_else(|| fatal(format!("{url}: not an http:// address")))?;
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) if !p.is_empty() => (h, format!("/{p}")),
        Some((h, _)) => (h, "/status".to_string()),
        None => (rest, "/status".to_string()),
    };
    if !host.rsplit_once(':').is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok()) {
        return Err(fatal(format!("{url}: give the host and port, as http://HOST:PORT")));
    }
    let exchange = async {
        let mut sock = TcpStream::connect(host).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        sock.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        sock.take(MAX_DOCUMENT).read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| retry(format!("{url}: no answer within {CLIENT_TIMEOUT:?}")))?
        .map_err(|e| retry(format!("{url}: {e}")))?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| fatal(format!("{url}: not an HTTP response")))?;
    let status_line =
        String::from_utf8_lossy(response[..split].split(|b| *b == b'\n').next().unwrap_or_default()).trim().to_string();
    let body = &response[split + 4..];
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let length =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse::<usize>().ok());
    if length.is_some_and(|n| body.len() < n) {
        // Cut short: the node stopped mid-answer, or the link is slow.
        return Err(retry(format!("{url}: answer cut short ({} of {} bytes)", body.len(), length.unwrap_or(0))));
    }
    match status_line.split_whitespace().nth(1) {
        Some("200") => {}
        // The node is up but has not published a status yet.
        Some("503") => return Err(retry(format!("{url}: {status_line}"))),
        _ => return Err(fatal(format!("{url}: {status_line}: {}", String::from_utf8_lossy(body).trim()))),
    }
    serde_json::from_slice(body).map_err(|e| fatal(format!("{url}: not a status document: {e}")))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn server() -> (String, Latest) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let latest: Latest = Arc::new(Mutex::new(None));
        tokio::spawn(serve(listener, latest.clone()));
        (url, latest)
    }

    #[tokio::test]
    async fn the_status_endpoint_serves_what_was_published_and_nothing_else() {
        let (url, latest) = server().await;
        let e = fetch(&url).await.unwrap_err();
        assert!(e.retry, "before the first status: try again ({})", e.message);
        *latest.lock().unwrap() = Some(Arc::new(br#"{"role":"primary","n":1}"#.to_vec()));
        let v = fetch(&url).await.unwrap();
        assert_eq!(v["role"], "primary");
        assert_eq!(fetch(&format!("{url}/status")).await.unwrap()["n"], 1);
        let e = fetch(&format!("{url}/metrics")).await.unwrap_err();
        assert!(!e.retry && e.message.contains("404"), "{}", e.message);
    }

    #[tokio::test]
    async fn a_request_split_across_writes_is_answered() {
        let (url, latest) = server().await;
        *latest.lock().unwrap() = Some(Arc::new(b"{}".to_vec()));
        let mut sock = tokio::net::TcpStream::connect(url.trim_start_matches("http://")).await.unwrap();
        sock.write_all(b"GET /sta").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        sock.write_all(b"tus HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        sock.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\n{}"), "{answer}");
    }

    #[tokio::test]
    async fn addresses_without_a_port_and_cut_short_answers_are_told_apart() {
        let e = fetch("http://127.0.0.1").await.unwrap_err();
        assert!(!e.retry, "no port: fatal ({})", e.message);
        let e = fetch("https://127.0.0.1:1").await.unwrap_err();
        assert!(!e.retry, "not http: fatal ({})", e.message);
        // A server that stops mid-answer: worth another try.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = sock.read(&mut buf).await;
            let _ = sock.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"role\":").await;
        });
        let e = fetch(&url).await.unwrap_err();
        assert!(e.retry && e.message.contains("cut short"), "{}", e.message);
    }
}
