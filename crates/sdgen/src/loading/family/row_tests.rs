//! The family table's rows agree with themselves, with the recognition tables, the named models
//! and the planner's profiles.

use super::*;
use crate::loading::{NamedModel, DEFAULT_MODEL, NAMED_MODELS};

#[test]
fn every_row_names_the_folders_it_reads() {
    for f in FAMILIES {
        let named = |c: &str| f.components.contains(&c) && !f.absent_components.contains(&c);
        assert!(named(f.denoiser.component), "{}: denoiser `{}`", f.name, f.denoiser.component);
        assert!(!f.encoders.is_empty(), "{} has no text encoder", f.name);
        for e in f.encoders {
            // An optional encoder is not required of a folder (detection must not need it).
            assert_eq!(named(e.component) && named(e.tokenizer), !e.optional, "{}: encoder `{}`", f.name, e.component);
        }
        if let Some(layout) = f.single_file {
            let held: Vec<&str> = layout.components.iter().map(|c| c.component).collect();
            for c in f.encoders.iter().map(|e| e.component).chain([f.denoiser.component, "vae"]) {
                assert!(held.contains(&c), "{}: its single files hold no `{c}`", f.name);
            }
        }
    }
}

#[test]
fn every_row_conditions_consistently() {
    for f in FAMILIES {
        // Micro-conditioning rides on SDXL's added embedding, which needs the pooled text.
        assert!(f.conditioning.micro.is_none() || f.takes_pooled_text(), "{}", f.name);
        // Token-joined states are appended to the channel-joined ones, so one of those must exist.
        assert!(f.encoders.iter().any(|e| e.join == ContextJoin::Channels), "{}", f.name);
        assert!(f.latent_channels > 0 && f.size_multiple > 0, "{}", f.name);
    }
}

#[test]
fn refiners_continue_a_base_with_their_latents_or_its_images() {
    // One latent space is one VAE: the same channels (and so the same initial noise's shape).
    for f in FAMILIES {
        for g in FAMILIES.iter().filter(|g| g.latent_space == f.latent_space) {
            assert_eq!(f.latent_channels, g.latent_channels, "{} and {}", f.name, g.name);
        }
    }
    for f in FAMILIES {
        for base in f.refines {
            let row = FamilySpec::by_name(base.name).expect("the base is a row");
            assert!(row.refines.is_empty(), "{} refines a refiner", f.name);
            match f.handoff_from(row) {
                // Latents continue one schedule in one space.
                Some(Handoff::Latents) => assert_eq!(row.schedule, f.schedule, "{}", f.name),
                Some(Handoff::Image) => assert_ne!(row.latent_space, f.latent_space, "{}", f.name),
                None => panic!("{} lists {} but does not refine it", f.name, row.name),
            }
        }
    }
    // SDXL hands its refiner latents, SD 3.5 (16 channels) its images; SD 1.5 is refined by none.
    let by = |name| FamilySpec::by_name(name).unwrap();
    let refiner = by("sdxl-refiner");
    assert_eq!(refiner.handoff_from(by("sdxl")), Some(Handoff::Latents));
    assert_eq!(refiner.handoff_from(by("sd35-large")), Some(Handoff::Image));
    assert_eq!(refiner.handoff_from(by("sd35-medium")), Some(Handoff::Image));
    assert_eq!(refiner.handoff_from(by("sd15")), None);
    assert_eq!(by("sdxl").handoff_from(by("sdxl")), None);
}

#[test]
fn names_are_unique_and_found() {
    for (i, f) in FAMILIES.iter().enumerate() {
        assert!(FAMILIES[..i].iter().all(|g| g.name != f.name), "{} twice", f.name);
        assert!(std::ptr::eq(FamilySpec::by_name(f.name).unwrap(), f));
    }
    assert!(FamilySpec::by_name("sd3").is_none());
}

#[test]
fn planner_profiles_are_the_rows_own() {
    for f in FAMILIES {
        assert_eq!(f.memory_profile().id, f.name);
    }
}

#[test]
fn named_models_are_rows() {
    assert!(FamilySpec::by_name(DEFAULT_MODEL).is_some());
    // Every row by its own name and repository; the other names are of a row's architecture.
    for f in FAMILIES {
        let m = NAMED_MODELS.iter().find(|m| m.name == f.name).expect("every row is named");
        assert_eq!((m.repo, m.family.name, m.defaults, m.scheduler), (f.hub_repo, f.name, None, None), "{}", f.name);
    }
    for (i, m) in NAMED_MODELS.iter().enumerate() {
        assert!(NAMED_MODELS[..i].iter().all(|o| o.name != m.name && o.repo != m.repo), "{} twice", m.name);
        assert!(FamilySpec::by_name(m.family.name).is_some(), "{}", m.name);
        assert!(std::ptr::eq(NamedModel::by_repo(&m.repo.to_uppercase()).unwrap(), m));
    }
}

#[test]
fn recognised_files_run_on_rows_with_single_files() {
    for s in SIGNATURES.iter().chain(PART_SIGNATURES) {
        if let Some(f) = s.family {
            let row = FamilySpec::by_name(f.name).expect("a row");
            assert!(row.single_file.is_some(), "{} runs on {} without single files", s.display, f.name);
        }
    }
}

#[test]
fn detection_finds_every_row_by_its_classes() {
    for f in FAMILIES {
        let has_component = |c: &str| f.components.contains(&c);
        let has_tensor = |k: &str| f.denoiser_markers.contains(&k);
        for class in f.pipeline_classes {
            assert_eq!(detect(class, has_component, has_tensor).map(|d| d.name), Some(f.name), "{class}");
        }
    }
}
