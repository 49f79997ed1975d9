//! Weights a long-lived engine keeps loaded between jobs ("warm"), as the planner sees them.
//!
//! A job is planned as if nothing were kept (its plan is never worse for weights it does not
//! use); then every stage of it must still fit with the warm weights beside it: a stage's
//! planned peak already holds its own weights, so a warm weight it runs with adds nothing, any
//! other adds its bytes. What does not fit is evicted, least recently used first — those the
//! job does not run before those it does, which it would only load again.

/// A stage of the job about to run, as the residency check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageResidency {
    /// Its planned peak in the budget's pool, its own weights included (0 when it runs on the
    /// host of a GPU: the device still holds the warm weights meanwhile).
    pub peak_bytes: u64,
    /// What every stage's peak must stay within (the plan's usable bytes).
    pub usable_bytes: u64,
    /// The warm weights it runs with (indices into the resident list): counted in its peak.
    pub reuses: Vec<usize>,
}

/// Whether every stage fits with the warm weights `resident` (bytes each) that are `kept`.
pub fn fits_with(stages: &[StageResidency], resident: &[u64], kept: &[bool]) -> bool {
    stages.iter().all(|s| {
        let beside: u64 = (0..resident.len()).filter(|&i| kept[i] && !s.reuses.contains(&i)).map(|i| resident[i]).sum();
        s.peak_bytes.saturating_add(beside) <= s.usable_bytes
    })
}

/// The warm weights to evict, in eviction order, so that every stage fits: `resident` lists
/// their bytes least recently used first. Those no stage runs with go first, then those it
/// does; empty when everything fits as it is.
pub fn evictions(stages: &[StageResidency], resident: &[u64]) -> Vec<usize> {
    let mut kept = vec![true; resident.len()];
    let used = |i: usize| stages.iter().any(|s| s.reuses.contains(&i));
    let order = (0..resident.len()).filter(|&i| !used(i)).chain((0..resident.len()).filter(|&i| used(i)));
    let mut evicted = Vec::new();
    for i in order {
        if fits_with(stages, resident, &kept) {
            break;
        }
        kept[i] = false;
        evicted.push(i);
    }
    evicted
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn stage(peak: u64, reuses: &[usize]) -> StageResidency {
        StageResidency { peak_bytes: peak * MB, usable_bytes: 100 * MB, reuses: reuses.to_vec() }
    }

    #[test]
    fn weights_a_stage_runs_with_are_not_counted_twice() {
        // The UNet stage holds 60 MB of its own (warm) weights; the text encoder's 30 MB beside it.
        let stages = [stage(40, &[0]), stage(70, &[1])];
        assert!(fits_with(&stages, &[30 * MB, 60 * MB], &[true, true]));
        assert!(evictions(&stages, &[30 * MB, 60 * MB]).is_empty());
        // Another model's 20 MB does not fit beside the UNet's peak: it goes, the job's stay.
        let resident = [20 * MB, 30 * MB, 60 * MB];
        let stages = [stage(40, &[1]), stage(70, &[2])];
        assert!(!fits_with(&stages, &resident, &[true; 3]));
        assert_eq!(evictions(&stages, &resident), [0]);
    }

    #[test]
    fn unused_weights_go_first_then_the_least_recently_used() {
        // Least recently used first: 0 and 2 are the job's, 1 and 3 are not.
        let resident = [10 * MB, 10 * MB, 50 * MB, 10 * MB];
        let stages = [stage(91, &[2]), stage(40, &[0])];
        // The first stage: 91 + 10 + 10 + 10 → the unused two go (in LRU order), then the
        // job's own encoder 0 (10 MB beside the 91 MB stage); its UNet 2 stays.
        assert_eq!(evictions(&stages, &resident), [1, 3, 0]);
        // A stage too big for anything beside it: everything goes, what the job runs with last.
        let stages = [stage(100, &[]), stage(10, &[2])];
        assert_eq!(evictions(&stages, &resident), [0, 1, 3, 2]);
    }

    #[test]
    fn a_job_too_big_for_anything_warm_keeps_nothing() {
        let stages = [stage(95, &[])];
        assert!(!fits_with(&stages, &[10 * MB], &[true]));
        assert!(fits_with(&stages, &[10 * MB], &[false]));
        assert_eq!(evictions(&stages, &[10 * MB]), [0]);
    }
}
