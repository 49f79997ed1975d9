//! The engine's opened models, most recently used first: a job on a model the engine has opened
//! before takes it from here, its family recognised, configs and safetensors headers parsed,
//! with no download check, no re-read and no re-validation.
//!
//! An entry holds what opening gave (configs, headers, the single file's tensor map), not
//! weights: the pipeline loads each stage's weights and drops them when the stage ends, as the
//! memory plan assumes. Entries are evicted least-recently-used past [`ModelCache::capacity`].

use super::request::ModelKey;
use crate::loading::ModelFolder;

/// An opened model and what the engine worked out about it once.
#[derive(Debug, Clone)]
pub(super) struct OpenedModel {
    pub folder: ModelFolder,
    /// A1111's `Model hash` of a checkpoint file, once computed (hashing gigabytes is slow).
    pub model_hash: Option<String>,
}

/// Opened models, most recently used first.
#[derive(Debug)]
pub(super) struct ModelCache {
    entries: Vec<(ModelKey, OpenedModel)>,
    capacity: usize,
    /// Models opened since the engine started (a cache hit opens none).
    pub opens: usize,
}

impl ModelCache {
    pub fn new(capacity: usize) -> Self {
        Self { entries: Vec::new(), capacity: capacity.max(1), opens: 0 }
    }

    /// The entry for `key`, now the most recently used.
    pub fn get(&mut self, key: &ModelKey) -> Option<&mut OpenedModel> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        let entry = self.entries.remove(i);
        self.entries.insert(0, entry);
        Some(&mut self.entries[0].1)
    }

    /// Adds a freshly opened model as the most recently used, evicting the least recently used
    /// beyond the capacity.
    pub fn insert(&mut self, key: ModelKey, folder: ModelFolder) -> &mut OpenedModel {
        self.opens += 1;
        self.entries.retain(|(k, _)| *k != key);
        self.entries.insert(0, (key, OpenedModel { folder, model_hash: None }));
        self.entries.truncate(self.capacity);
        &mut self.entries[0].1
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loading::ModelSource;

    fn key(name: &str) -> ModelKey {
        ModelKey { source: ModelSource::Path(name.into()), vae: None, config_from: None }
    }

    #[test]
    fn the_least_recently_used_goes_first() {
        let dir = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/tiny-sd15"));
        let folder = ModelFolder::open(dir).unwrap();
        let mut cache = ModelCache::new(2);
        cache.insert(key("a"), folder.clone());
        cache.insert(key("b"), folder.clone());
        assert!(cache.get(&key("a")).is_some(), "a is now the most recent");
        cache.insert(key("c"), folder);
        assert!(cache.get(&key("b")).is_none(), "b was the least recently used");
        assert!(cache.get(&key("a")).is_some() && cache.get(&key("c")).is_some());
        assert_eq!((cache.len(), cache.opens), (2, 3));
    }
}
