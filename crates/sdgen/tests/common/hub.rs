//! Helpers of the hub tests: options pointing at a local fake hub, and what it served.

use std::collections::BTreeSet;
use std::path::Path;

use hub_test_server::HubServer;
use sdgen::hub::HubOptions;
use sdgen::Error;

/// Hub options for `server`, with the cache under `home` and nothing from the environment.
pub fn options(server: &HubServer, home: &Path) -> HubOptions {
    let (endpoint, home) = (server.endpoint(), home.display().to_string());
    HubOptions::from_vars(|k| match k {
        "HF_ENDPOINT" => Some(endpoint.clone()),
        "HF_HOME" => Some(home.clone()),
        _ => None,
    })
}

/// The message of an input error (panics on any other kind).
pub fn message(e: Error) -> String {
    assert!(matches!(e, Error::InvalidInput(_)), "not an input error: {e:?}");
    e.to_string()
}

/// Files whose bytes were requested (metadata probes excluded), as a set.
pub fn downloaded(server: &HubServer) -> BTreeSet<String> {
    server.downloaded_files().into_iter().collect()
}
