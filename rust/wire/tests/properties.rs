//! Property tests: codecs round-trip, and no input makes the parser panic.

use fp_wire::{split_envelope, Auth, Limits, Packer, Parts, Value, DELIMITER};
use proptest::prelude::*;

fn value_strategy() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        (i64::MAX as u64 + 1..=u64::MAX).prop_map(Value::UInt),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::Float),
        ".{0,40}".prop_map(Value::Str),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Value::Bin),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec(("[a-z]{1,8}", inner), 0..8).prop_map(|kv| {
                let mut seen = std::collections::HashSet::new();
                Value::Map(
                    kv.into_iter()
                        .filter(|(k, _)| seen.insert(k.clone()))
                        .map(|(k, v)| (Value::Str(k), v))
                        .collect(),
                )
            }),
        ]
    })
}

fn contains_bin(v: &Value) -> bool {
    match v {
        Value::Bin(_) => true,
        Value::Array(items) => items.iter().any(contains_bin),
        Value::Map(items) => items
            .iter()
            .any(|(k, v)| contains_bin(k) || contains_bin(v)),
        _ => false,
    }
}

proptest! {
    #[test]
    fn msgpack_round_trips(v in value_strategy()) {
        let packed = Packer::Msgpack.pack(&v).unwrap();
        prop_assert_eq!(Packer::Msgpack.unpack(&packed, "content").unwrap(), v);
    }

    #[test]
    fn json_round_trips_without_bytes(v in value_strategy()) {
        prop_assume!(!contains_bin(&v));
        let packed = Packer::Json.pack(&v).unwrap();
        let back = Packer::Json.unpack(&packed, "content").unwrap();
        // JSON has one number type per value; floats that are integral may come back as floats.
        prop_assert_eq!(Packer::Json.pack(&back).unwrap(), packed);
    }

    #[test]
    fn unpack_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Packer::Msgpack.unpack(&data, "content");
        let _ = Packer::Json.unpack(&data, "content");
    }

    #[test]
    fn parse_never_panics(frames in proptest::collection::vec(
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..40),
            Just(DELIMITER.to_vec()),
        ], 0..12)) {
        let mut auth = Auth::new(b"key", "hmac-sha256").unwrap();
        if let Ok(env) = split_envelope(frames, &Limits::default()) {
            let _ = env.verify(&mut auth, true);
            let _ = env.unpack(Packer::Msgpack);
            let _ = env.unpack(Packer::Json);
        }
    }

    #[test]
    fn signed_messages_verify_and_tampering_is_caught(
        content in value_strategy(), flip in 0usize..4, bit in 0u8..8,
    ) {
        let mut auth = Auth::new(b"a-key", "hmac-sha256").unwrap();
        let parts = Parts {
            header: Value::map([("msg_id", Value::from("m")), ("msg_type", Value::from("t"))]),
            parent_header: Value::empty_map(),
            metadata: Value::empty_map(),
            content,
        };
        let mut packed = parts.pack(Packer::Msgpack).unwrap();
        let sig = auth.sign(&[&packed[0], &packed[1], &packed[2], &packed[3]]);
        let mut frames = vec![b"ident".to_vec(), DELIMITER.to_vec(), sig.clone()];
        frames.extend(packed.iter().cloned());
        let env = split_envelope(frames, &Limits::default()).unwrap();
        prop_assert!(env.verify(&mut auth, false).is_ok());
        prop_assert_eq!(env.unpack(Packer::Msgpack).unwrap(), parts);
        let target = &mut packed[flip];
        if !target.is_empty() {
            let last = target.len() - 1;
            target[last] ^= 1 << bit;
            let r = auth.verify(&sig, &[&packed[0], &packed[1], &packed[2], &packed[3]], false);
            prop_assert!(r.is_err());
        }
    }
}
