//! Randomized model check: a sequence of pins, writes (both policies), truncations,
//! writebacks and external changes against a reference model (the file's current bytes).
//! Every pin must equal the model at pin time and must never change while held.

mod common;

use pagecache::{Error, Pin, PAGE_SIZE};
use proptest::prelude::*;

const MAX_LEN: u64 = 6 * PAGE_SIZE as u64;

#[derive(Debug, Clone)]
enum Op {
    Pin {
        start: u64,
        len: u64,
    },
    SubPin {
        which: usize,
        start_frac: u8,
        len_frac: u8,
    },
    Release {
        which: usize,
    },
    Write {
        cow: bool,
        offset: u64,
        len: usize,
        seed: u8,
    },
    SetLen {
        cow: bool,
        len: u64,
    },
    Writeback,
    Fsync,
    External {
        len: u64,
        seed: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..MAX_LEN, 0..3 * PAGE_SIZE as u64).prop_map(|(start, len)| Op::Pin { start, len }),
        1 => (any::<usize>(), any::<u8>(), any::<u8>())
            .prop_map(|(which, start_frac, len_frac)| Op::SubPin { which, start_frac, len_frac }),
        3 => any::<usize>().prop_map(|which| Op::Release { which }),
        4 => (any::<bool>(), 0..MAX_LEN, 1..2 * PAGE_SIZE, any::<u8>())
            .prop_map(|(cow, offset, len, seed)| Op::Write { cow, offset, len, seed }),
        1 => (any::<bool>(), 0..MAX_LEN).prop_map(|(cow, len)| Op::SetLen { cow, len }),
        1 => Just(Op::Writeback),
        1 => Just(Op::Fsync),
        1 => (0..MAX_LEN, any::<u8>()).prop_map(|(len, seed)| Op::External { len, seed }),
    ]
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed) | 1)
        .collect()
}

struct HeldPin {
    pin: Pin,
    expected: Vec<u8>,
}

fn check_held(held: &[HeldPin]) {
    for h in held {
        assert_eq!(
            h.pin.to_vec(),
            h.expected,
            "pinned bytes changed: {:?}",
            h.pin
        );
    }
}

fn run(ops: Vec<Op>, frames: usize) {
    let dir = common::temp_dir("pagecache-model");
    let initial = bytes(2 * PAGE_SIZE + 100, 200);
    let path = common::make_file(&dir, "model", &initial);
    let cache = common::cache(frames, common::model_config());
    let (cow, wait) = common::cow_and_impatient_writers(&cache, &path);
    let mut model = initial;
    let mut held: Vec<HeldPin> = Vec::new();

    for op in ops {
        match op {
            Op::Pin { start, len } => {
                let start = start.min(model.len() as u64);
                let end = (start + len).min(model.len() as u64);
                match cow.pin(start..end) {
                    Ok(pin) => {
                        let expected = model[start as usize..end as usize].to_vec();
                        assert_eq!(pin.to_vec(), expected, "pin differs from model");
                        held.push(HeldPin { pin, expected });
                    }
                    Err(Error::OutOfFrames { .. }) => {}
                    Err(e) => panic!("pin failed: {e}"),
                }
            }
            Op::SubPin {
                which,
                start_frac,
                len_frac,
            } => {
                if held.is_empty() {
                    continue;
                }
                let parent = &held[which % held.len()];
                let r = parent.pin.range();
                let start = r.start + (r.end - r.start) * u64::from(start_frac) / 255;
                let end = start + (r.end - start) * u64::from(len_frac) / 255;
                let sub = parent.pin.sub_pin(start..end);
                let from = (start - r.start) as usize;
                let expected = parent.expected[from..from + (end - start) as usize].to_vec();
                assert_eq!(sub.to_vec(), expected);
                held.push(HeldPin { pin: sub, expected });
            }
            Op::Release { which } => {
                if !held.is_empty() {
                    let i = which % held.len();
                    held.swap_remove(i);
                }
            }
            Op::Write {
                cow: use_cow,
                offset,
                len,
                seed,
            } => {
                let offset = offset.min(model.len() as u64);
                let data = bytes(len, seed);
                let handle = if use_cow { &cow } else { &wait };
                match handle.write(offset, &data) {
                    Ok(()) => {
                        common::write_to_model(&mut model, offset as usize, &data);
                    }
                    Err(Error::WriteTimeout { .. }) if !use_cow => {}
                    Err(Error::OutOfFrames { .. }) => {}
                    Err(e) => panic!("write failed: {e}"),
                }
            }
            Op::SetLen { cow: use_cow, len } => {
                let handle = if use_cow { &cow } else { &wait };
                match handle.set_len(len) {
                    Ok(()) => model.resize(len as usize, 0),
                    Err(Error::WriteTimeout { .. }) if !use_cow => {}
                    Err(Error::OutOfFrames { .. }) => {}
                    Err(e) => panic!("set_len failed: {e}"),
                }
            }
            Op::Writeback => cache.writeback_all().unwrap(),
            Op::Fsync => {
                cow.fsync().unwrap();
                assert_eq!(std::fs::read(&path).unwrap(), model, "disk after fsync");
            }
            Op::External { len, seed } => {
                // Our unwritten writes lose against an external change: flush them first so
                // the model stays simple, then let "another process" replace the content.
                cow.fsync().unwrap();
                let data = bytes(len as usize, seed);
                common::change_externally(&path, &data, u64::from(seed) + 1);
                assert!(cow.revalidate().unwrap());
                model = data;
            }
        }
        assert_eq!(cow.len(), model.len() as u64, "length");
        check_held(&held);
    }
    // Final: whole file equals the model, and after fsync so does the disk.
    let all = loop {
        match cow.pin(0..model.len() as u64) {
            Ok(p) => break p,
            Err(Error::OutOfFrames { .. }) => {
                held.pop().expect("out of frames with nothing held");
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(all.to_vec(), model);
    check_held(&held);
    drop(all);
    drop(held);
    cow.fsync().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), model);
    common::assert_settled(&cache.stats());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn model_roomy_arena(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, 64);
    }

    #[test]
    fn model_tight_arena(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, 8);
    }
}
