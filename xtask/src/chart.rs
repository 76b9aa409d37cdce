//! The Helm chart's checks (helm/tests/test_chart.py): helm lint --strict,
//! helm template with the default values and with every optional feature on
//! (helm/vigil/ci/), kubernetes-validate on the rendered manifests, the values
//! schema rejecting bad values and matching `vigil default-config`, the
//! rendered DaemonSet's security properties, the alert rules' metrics and
//! PromQL (promtool), and the chart's copy of the dashboards. helm and
//! kubernetes-validate come from `cargo xtask setup`.

use std::{path::Path, process::Command};

use crate::{run, setup, workspace_root};

/// Runs the chart's tests; `vigil` is a built agent binary.
pub fn check(vigil: &Path) -> anyhow::Result<()> {
    run(
        Command::new(setup::chart_python_venv().join("bin").join("python"))
            .arg("helm/tests/test_chart.py")
            .env("HELM", setup::helm_path())
            .env("VIGIL_BIN", vigil),
    )
}

/// `cargo xtask chart`: builds the (debug) agent, then checks.
pub fn build_and_check() -> anyhow::Result<()> {
    run(Command::new("cargo").args(["build", "-p", "vigil", "--bin", "vigil"]))?;
    check(&workspace_root().join("target").join("debug").join("vigil"))
}
