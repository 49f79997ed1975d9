//! Serves local folders as hub repos, for trying downloads by hand:
//! `hub-test-server [--port N] ORG/NAME=DIR...`, then `HF_ENDPOINT=<printed url> generate --model ORG/NAME ...`.

use std::path::Path;

use hub_test_server::{FakeRepo, HubServer};

fn main() -> std::io::Result<()> {
    let mut port = 0u16;
    let mut repos = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--port" {
            port = args.next().and_then(|p| p.parse().ok()).expect("--port takes a number");
        } else if let Some((id, dir)) = arg.split_once('=') {
            repos.push(FakeRepo::from_dir(id, Path::new(dir))?);
        } else {
            eprintln!("usage: hub-test-server [--port N] ORG/NAME=DIR...");
            std::process::exit(2);
        }
    }
    let server = HubServer::start_on(repos, port)?;
    println!("{}", server.endpoint());
    loop {
        std::thread::park();
    }
}
