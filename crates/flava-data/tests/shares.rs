//! Data shares: the processes of a distributed job each build some shares of every batch; the
//! union of their rows must be, exactly, the batch one process building all shares gets, also
//! across skipped records, epochs and a resume from the merged state.

use std::collections::BTreeMap;
use std::path::PathBuf;

mod common;
use common::{builder, write_tar};

use flava_data::batch::HostBatch;
use flava_data::loader::{DataLoader, LoadedBatch, LoaderConfig, LoaderError, Mix, MixerState, Shares};
use flava_data::sources::{SkipReason, Source};
use flava_data::spec::{open_source, SourceOptions};
use flava_data::task::Task;

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flava-shares-{}-{name}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn png(v: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(12, 12, image::Rgb([v, 255 - v, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// A 23-pair shard with a corrupt image every 5th sample, and synthetic images and text.
fn shard(d: &std::path::Path) -> String {
    let mut members = Vec::new();
    for i in 0..23u8 {
        let img = if i % 5 == 3 {
            b"not an image".to_vec()
        } else {
            png(i * 10)
        };
        members.push((format!("s/{i:04}.png"), img));
        members.push((format!("s/{i:04}.txt"), format!("caption number {i}").into_bytes()));
    }
    let refs: Vec<(&str, Vec<u8>)> = members.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    let p = d.join("000.tar");
    write_tar(&p, &refs, None);
    p.display().to_string()
}

fn sources(tar: &str) -> Result<BTreeMap<Task, Vec<Box<dyn Source>>>, LoaderError> {
    let o = SourceOptions {
        seed: 3,
        shuffle_buffer: 7,
        synthetic_len: 13,
        synthetic_image_size: 24,
        ..Default::default()
    };
    Ok(BTreeMap::from([
        (Task::Pairs, vec![open_source(tar, Task::Pairs, &o)?]),
        (Task::Images, vec![open_source("synthetic", Task::Images, &o)?]),
        (Task::Text, vec![open_source("synthetic", Task::Text, &o)?]),
    ]))
}

fn cfg() -> LoaderConfig {
    LoaderConfig {
        mix: Mix::parse("pairs=2,images=1,text=1").unwrap(),
        seed: 11,
        ..Default::default()
    }
}

fn loader(tar: &str, shares: Shares, resume: Option<MixerState>) -> Result<DataLoader, LoaderError> {
    DataLoader::with_shares(shares, |_| sources(tar), builder(4), cfg(), resume)
}

fn take(l: &mut DataLoader, n: usize) -> Vec<LoadedBatch> {
    (0..n).map(|_| l.next_batch().unwrap()).collect()
}

#[test]
fn the_ranks_rows_are_the_whole_batch() {
    let d = scratch("union");
    let tar = shard(&d);
    let all = Shares {
        count: 2,
        take: vec![0, 1],
    };
    let mut whole = loader(&tar, all, None).unwrap();
    let mut r0 = loader(&tar, Shares::of_rank(2, 0, 2).unwrap(), None).unwrap();
    let mut r1 = loader(&tar, Shares::of_rank(2, 1, 2).unwrap(), None).unwrap();
    // 30 steps: the 23-record shard (18 usable) passes several epochs per share.
    let (w, a, b) = (take(&mut whole, 30), take(&mut r0, 30), take(&mut r1, 30));
    let mut corrupt = 0;
    for (i, ((w, a), b)) in w.iter().zip(&a).zip(&b).enumerate() {
        assert_eq!((a.batch.batch_size, b.batch.batch_size), (2, 2));
        let joined = HostBatch::concat(vec![a.batch.clone(), b.batch.clone()]);
        assert_eq!(
            joined, w.batch,
            "step {i}: rank 0's rows then rank 1's are the whole batch"
        );
        assert_eq!(w.batch.split(2), vec![a.batch.clone(), b.batch.clone()]);
        // Within an epoch the shares read disjoint records.
        if w.batch.task == Task::Pairs {
            assert!(a.batch.keys.iter().all(|k| !b.batch.keys.contains(k)), "step {i}");
        }
        let merged = MixerState::merge(&[a.state_after.clone(), b.state_after.clone()]).unwrap();
        assert_eq!(
            merged, w.state_after,
            "step {i}: the merged state is the whole loader's"
        );
        corrupt = w.stats[&Task::Pairs]
            .skipped
            .get(&SkipReason::CorruptImage)
            .copied()
            .unwrap_or(0);
        let parts: u64 = [a, b]
            .iter()
            .map(|x| {
                x.stats[&Task::Pairs]
                    .skipped
                    .get(&SkipReason::CorruptImage)
                    .copied()
                    .unwrap_or(0)
            })
            .sum();
        assert_eq!(parts, corrupt, "skips are counted once, by the share that read them");
    }
    assert!(corrupt >= 5, "the corrupt records were met and skipped: {corrupt}");
    // Shares differ from the one-share loader (each share forms its own sub-batch), but
    // one share of one is the plain loader.
    let mut plain = DataLoader::new(sources(&tar).unwrap(), builder(4), cfg(), None).unwrap();
    let mut one = loader(&tar, Shares::default(), None).unwrap();
    for _ in 0..6 {
        assert_eq!(plain.next_batch().unwrap().batch, one.next_batch().unwrap().batch);
    }
}

#[test]
fn ranks_resume_from_the_merged_state() {
    let d = scratch("resume");
    let tar = shard(&d);
    let mut whole = loader(
        &tar,
        Shares {
            count: 2,
            take: vec![0, 1],
        },
        None,
    )
    .unwrap();
    let w = take(&mut whole, 25);
    let k = 11;
    let mut r0 = loader(&tar, Shares::of_rank(2, 0, 2).unwrap(), None).unwrap();
    let mut r1 = loader(&tar, Shares::of_rank(2, 1, 2).unwrap(), None).unwrap();
    let (a, b) = (take(&mut r0, k + 1), take(&mut r1, k + 1));
    // What rank 0 writes into the checkpoint: every rank's state, merged; through JSON.
    let merged = MixerState::merge(&[a[k].state_after.clone(), b[k].state_after.clone()]).unwrap();
    let json = serde_json::to_string(&merged).unwrap();
    let state: MixerState = serde_json::from_str(&json).unwrap();
    let mut r0 = loader(&tar, Shares::of_rank(2, 0, 2).unwrap(), Some(state.clone())).unwrap();
    let mut r1 = loader(&tar, Shares::of_rank(2, 1, 2).unwrap(), Some(state.clone())).unwrap();
    // One process may continue the same job too (all shares, same share count).
    let mut alone = loader(
        &tar,
        Shares {
            count: 2,
            take: vec![0, 1],
        },
        Some(state.clone()),
    )
    .unwrap();
    for want in &w[k + 1..] {
        let (x, y) = (r0.next_batch().unwrap(), r1.next_batch().unwrap());
        assert_eq!(HostBatch::concat(vec![x.batch, y.batch]), want.batch);
        assert_eq!(alone.next_batch().unwrap().batch, want.batch);
    }
    // Another share count is refused, naming the one to use.
    let err = loader(&tar, Shares::of_rank(4, 0, 4).unwrap(), Some(state.clone()))
        .err()
        .expect("share count 4 against a 2-share checkpoint");
    assert!(err.to_string().contains("--data-shares 2"), "{err}");
    // A state lacking this process's share (one rank's, not merged) is refused too.
    let err = loader(&tar, Shares::of_rank(2, 1, 2).unwrap(), Some(a[k].state_after.clone()))
        .err()
        .expect("rank 0's state has no share 1");
    assert!(err.to_string().contains("no position for data share 1"), "{err}");
    // States of different steps do not merge.
    assert!(MixerState::merge(&[a[3].state_after.clone(), b[4].state_after.clone()]).is_err());
}

#[test]
fn share_counts_that_do_not_fit_are_clear_errors() {
    let d = scratch("fit");
    let tar = shard(&d);
    let e = loader(
        &tar,
        Shares {
            count: 3,
            take: vec![0],
        },
        None,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("must divide the batch size"), "{e}");
    assert!(Shares::of_rank(3, 0, 2)
        .unwrap_err()
        .to_string()
        .contains("cannot be split evenly"));
    assert_eq!(Shares::of_rank(4, 1, 2).unwrap().take, [2, 3]);
    // A source with fewer records than shares: the empty share says so instead of spinning.
    let tiny = d.join("tiny.tar");
    write_tar(&tiny, &[("t/1.png", png(1)), ("t/1.txt", b"one".to_vec())], None);
    let tiny = tiny.display().to_string();
    let mut l = DataLoader::with_shares(
        Shares {
            count: 2,
            take: vec![1],
        },
        |_| {
            Ok(BTreeMap::from([(
                Task::Pairs,
                vec![open_source(&tiny, Task::Pairs, &SourceOptions::default())?],
            )]))
        },
        builder(2),
        LoaderConfig::default(),
        None,
    )
    .unwrap();
    let Err(e) = l.next_batch() else {
        panic!("share 1 of a 1-record source is empty")
    };
    assert!(e.to_string().contains("too few records for the data shares"), "{e}");
}
