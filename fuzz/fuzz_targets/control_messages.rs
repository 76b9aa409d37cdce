//! The control API's messages as any client could send them: a registration
//! and a stream of load reports decoded from arbitrary bytes, run through
//! the registrations and the control loop. Refused or accepted, never a
//! panic; every published pool target stays within the declared bounds.
#![no_main]
use std::sync::Arc;

use prost::Message;
use vigil::act::{
    pools::PoolLaw,
    selector::Workload,
    services::{ServiceSettings, Services},
    ActState, ActuationMode,
};
use vigil::socket_health::SocketTable;
use vigil_control::v1;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let (register, reports) = rest.split_at((split as usize).min(rest.len()));
    let Ok(req) = v1::RegisterRequest::decode(register) else {
        return;
    };
    for law in [PoolLaw::Kernel, PoolLaw::Classic] {
        let mut s = Services::new(
            ServiceSettings {
                mode: ActuationMode::Enforce,
                selectors: vec![],
                pool_law: law,
                period_ms: 1000,
                max_registrations: 4,
                max_streams_per_workload: 2,
            },
            Arc::new(ActState::new(16)),
        );
        let me = Workload {
            pid: 1,
            process: "fuzz".into(),
            cgroup: Some("fuzz".into()),
            pod: None,
        };
        let Ok(resp) = s.register(me.clone(), &req) else {
            return;
        };
        let Ok(targets) = s.watch(&me.key(), &resp.registration) else {
            panic!("its own registration must be watchable");
        };
        for chunk in reports.chunks(48) {
            if let Ok(mut r) = v1::LoadReport::decode(chunk) {
                r.registration.clone_from(&resp.registration);
                let _ = s.report(&me.key(), &r);
            }
            s.tick(&SocketTable::default());
        }
        let t = targets.borrow();
        for p in &t.pools {
            let declared = req.pools.iter().find(|q| q.name == p.pool);
            let b = declared.and_then(|q| q.idle_bounds).expect("a declared pool");
            assert!((b.min..=b.max).contains(&p.max_idle), "{p:?} outside {b:?}");
        }
    }
});
