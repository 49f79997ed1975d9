//! The faults: stalled downloads and unanswered requests, seen from a raw socket.

use super::*;
use std::io::Read;

/// Sends a GET for `path` and reads until the server goes quiet for 300 ms or closes:
/// the stream (to read on later), what arrived, and whether the server closed the connection.
fn get(server: &HubServer, path: &str, stream: Option<TcpStream>) -> (TcpStream, Vec<u8>, bool) {
    let mut stream = stream.unwrap_or_else(|| {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
        s
    });
    stream.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (stream, got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return (stream, got, false)
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn body_of(response: &[u8]) -> &[u8] {
    let at = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    &response[at + 4..]
}

#[test]
fn a_stalled_download_sends_part_of_the_body_then_nothing_until_released() {
    let bytes: Vec<u8> = (0..100u8).collect();
    let server = HubServer::start(vec![FakeRepo::new("org/m").with_file("w.safetensors", bytes.clone())]).unwrap();
    server.stall_first_download("w.safetensors", 10);
    let path = "/org/m/resolve/main/w.safetensors";
    let (stream, got, closed) = get(&server, path, None);
    assert!(!closed);
    assert!(String::from_utf8_lossy(&got).contains("Content-Length: 100"));
    assert_eq!(body_of(&got), &bytes[..10]);
    server.release_stalls();
    let (_, more, closed) = get(&server, path, Some(stream));
    assert!(closed && more.is_empty());
    // Armed once: the next download is whole.
    let (_, got, closed) = get(&server, path, None);
    assert!(closed);
    assert_eq!(body_of(&got), &bytes[..]);
}

#[test]
fn a_hung_request_gets_no_answer_until_released() {
    let server = HubServer::start(vec![FakeRepo::new("org/m").with_file("config.json", b"{}".to_vec())]).unwrap();
    let path = "/api/models/org/m/revision/main";
    server.hang_first_request(path);
    let (stream, got, closed) = get(&server, path, None);
    assert!(!closed && got.is_empty());
    assert_eq!(server.requests().len(), 1);
    server.release_stalls();
    let (_, got, closed) = get(&server, path, Some(stream));
    assert!(closed && got.is_empty());
    let (_, got, _) = get(&server, path, None);
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
}
