//! Text the agent reads from the system or the operator: tracefs format files,
//! mountinfo, cgroup paths, metrics text (the CLI reads the agent's), the
//! CLI's --agent, and the TOML config. (HTTP requests are hyper's to parse.)
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = vigil::loader::tracefs::field_offset(text, "skaddr");
    let _ = vigil::enrich::cgroups::cgroup2_mount(text);
    let _ = vigil::enrich::workload::parse(text);
    let _ = vigil::triage::render_status("127.0.0.1:9464", text);
    if let Ok(endpoint) = text.parse::<vigil::query::Endpoint>() {
        assert!(!endpoint.to_string().is_empty());
    }
    if let Ok(config) = vigil::config::Config::from_toml(text) {
        let _ = config.validate(vigil::loader::hook_names());
    }
});
