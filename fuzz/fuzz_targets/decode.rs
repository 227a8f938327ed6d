//! Fuzz the MQTT decoder: any bytes, both versions, a small packet limit. Whatever decodes must
//! re-encode, and the re-encoding must decode to the same packet.
#![no_main]

use bytes::BytesMut;
use ferrymq_mqtt::{decode, encode, Limits, ProtocolVersion};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_packet_size: 64 * 1024,
    };
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut buf = BytesMut::from(data);
        while let Ok(Some(packet)) = decode(&mut buf, version, &limits) {
            let mut out = BytesMut::new();
            if encode(&packet, version, &mut out).is_ok() {
                let again = decode(&mut out, version, &Limits::default());
                assert_eq!(again, Ok(Some(packet)));
            }
        }
    }
});
