//! The deployment material under `deploy/`: the Kubernetes variants rendered and validated
//! offline against the Kubernetes API schemas and checked against keygate's own configuration,
//! the container image against the config it bakes in, the alert rules checked and unit-tested
//! with promtool, and every metric the dashboard and the alerts query checked against what a
//! running keygate exports.
//!
//! Outside tools are needed; CI installs them, and a missing one fails (never skips) the test
//! that needs it, saying how to install it:
//! - `python3 -m pip install 'kubernetes-validate==1.37.0' 'check-jsonschema==0.39.0'` — schema
//!   validators that ship their schemas (Kubernetes', the Compose specification's: no network);
//!   they bring PyYAML, used here to read YAML (`PYTHON` picks another interpreter, e.g. a
//!   virtualenv's);
//! - `apt-get install --no-install-recommends prometheus` — for promtool.
//!
//! `kubectl`, when present, renders the kustomize trees too, and its output must equal ours.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{client, free_port, keys, rpc, Stack};

/// Kubernetes versions the manifests are validated against: the oldest the variants support
/// (sidecar containers and the preStop `sleep` action are both on by default from 1.30) and the
/// newest the validator knows.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// Custom resources of the Prometheus Operator: no schema ships for them, so they are checked
/// structurally here instead.
const CUSTOM_KINDS: [&str; 2] = ["ServiceMonitor", "PrometheusRule"];

const INSTALL_VALIDATORS: &str =
    "python3 -m pip install 'kubernetes-validate==1.37.0' 'check-jsonschema==0.39.0'";
const INSTALL_PROMTOOL: &str = "apt-get install -y --no-install-recommends prometheus";

/// Every metric keygate exports; the dashboard must show each of them.
const EXPORTED_METRICS: [&str; 18] = [
    "keygate_requests_total",
    "keygate_request_duration_seconds",
    "keygate_upstream_duration_seconds",
    "keygate_requests_in_flight",
    "keygate_sse_streams_open",
    "keygate_auth_total",
    "keygate_jwks_fetches_total",
    "keygate_jwks_age_seconds",
    "keygate_token_cache_total",
    "keygate_key_store_operations_total",
    "keygate_key_store_duration_seconds",
    "keygate_key_cache_total",
    "keygate_key_decrypt_failures_total",
    "keygate_rate_limit_decisions_total",
    "keygate_rate_limit_fallbacks_total",
    "keygate_policy_denials_total",
    "keygate_upstream_errors_total",
    "keygate_build_info",
];

/// Values that pass keygate's validation, standing in for the real secrets.
const TEST_SECRET: &str = "3f8a1c9e57b2d4067e1fa93c28d5b6409c7e2a15f3b8d06e4a91c7253df80b6e";
const TEST_PUBLISHABLE_KEY: &str = "pk_test_Y2xlcmsuZXhhbXBsZS5jb20k";
const TEST_CLERK_SECRET_KEY: &str = "sk_test_0123456789abcdef";

// ---------------------------------------------------------------------------------------------
// Files and tools

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn deploy_path(rel: &str) -> PathBuf {
    repo().join("deploy").join(rel)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A scratch file unique to this process and call.
fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "keygate-deploy-{}-{}-{name}",
        std::process::id(),
        free_port()
    ))
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn run(cmd: &mut Command) -> Option<Output> {
    match cmd.output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("running {cmd:?}: {e}"),
    }
}

fn text_of(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Fail, with the way to install them, unless the schema validators (and PyYAML) import.
fn require_validators() {
    static FOUND: OnceLock<bool> = OnceLock::new();
    let py = python();
    let ok = *FOUND.get_or_init(|| {
        let imports = "import kubernetes_validate, check_jsonschema, yaml";
        run(Command::new(&py).args(["-c", imports])).is_some_and(|o| o.status.success())
    });
    assert!(
        ok,
        "kubernetes-validate or check-jsonschema is not installed for `{py}`. Install them \
         with:\n    {INSTALL_VALIDATORS}\n(CI installs them; set PYTHON to use another \
         interpreter)"
    );
}

fn require_promtool() {
    let ok = run(Command::new("promtool").arg("--version")).is_some_and(|o| o.status.success());
    assert!(
        ok,
        "promtool is not installed. Install it with:\n    {INSTALL_PROMTOOL}\n(CI installs it)"
    );
}

/// The YAML documents of a file, as JSON values (empty documents dropped), read by PyYAML:
/// the validator depends on it, and Rust has no YAML parser among this crate's dependencies.
fn yaml_file(path: &Path) -> Vec<Value> {
    require_validators();
    const TO_JSON: &str = "import json, sys, yaml\n\
        with open(sys.argv[1], encoding='utf-8') as f:\n\
        \x20   print(json.dumps([d for d in yaml.safe_load_all(f) if d is not None]))\n";
    let out = run(Command::new(python()).arg("-c").arg(TO_JSON).arg(path)).expect("python runs");
    assert!(
        out.status.success(),
        "reading YAML from {} failed:\n{}",
        path.display(),
        text_of(&out)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from the YAML reader")
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {v}"))
}

// ---------------------------------------------------------------------------------------------
// Rendering the kustomize trees

/// One object of a rendered variant, with the file it came from.
#[derive(Debug, Clone)]
struct Manifest {
    file: PathBuf,
    doc: Value,
}

impl Manifest {
    fn kind(&self) -> &str {
        str_at(&self.doc, "/kind")
    }
    fn name(&self) -> &str {
        str_at(&self.doc, "/metadata/name")
    }
}

/// Render a kustomization the way `kustomize build` does for one that only lists `resources`:
/// every listed file's documents in order, directories rendered recursively. Anything else in a
/// kustomization is refused, so this can never silently render something kustomize would not.
fn render(dir: &Path) -> Vec<Manifest> {
    let file = dir.join("kustomization.yaml");
    let docs = yaml_file(&file);
    assert_eq!(docs.len(), 1, "{}: one document", file.display());
    let k = &docs[0];
    for key in k.as_object().expect("a mapping").keys() {
        assert!(
            ["apiVersion", "kind", "resources"].contains(&key.as_str()),
            "{}: `{key}` is not rendered by this test (it only concatenates `resources`); \
             keep the kustomizations to resources or teach render() the feature",
            file.display()
        );
    }
    assert_eq!(str_at(k, "/kind"), "Kustomization", "{}", file.display());
    let mut out = Vec::new();
    for entry in k["resources"].as_array().expect("resources: a list") {
        let path = dir.join(entry.as_str().expect("a resource path"));
        if path.is_dir() {
            out.extend(render(&path));
        } else {
            assert!(
                path.is_file(),
                "{}: {} is missing",
                file.display(),
                path.display()
            );
            out.extend(yaml_file(&path).into_iter().map(|doc| Manifest {
                file: path.clone(),
                doc,
            }));
        }
    }
    out
}

/// `kubectl kustomize` of the same tree, when kubectl is installed.
fn kubectl_render(dir: &Path) -> Option<Vec<Value>> {
    let out = run(Command::new("kubectl").arg("kustomize").arg(dir))?;
    assert!(
        out.status.success(),
        "kubectl kustomize {}:\n{}",
        dir.display(),
        text_of(&out)
    );
    let file = scratch("kubectl.yaml");
    std::fs::write(&file, &out.stdout).expect("write kubectl output");
    let docs = yaml_file(&file);
    let _ = std::fs::remove_file(&file);
    Some(docs)
}

fn sorted_json(docs: impl IntoIterator<Item = Value>) -> Vec<String> {
    let mut v: Vec<String> = docs.into_iter().map(|d| d.to_string()).collect();
    v.sort();
    v
}

/// Run kubernetes-validate (strict: unknown fields are errors) over `manifests`, against every
/// version in [`KUBERNETES_VERSIONS`]; each one must pass against each version.
fn validate_schemas(variant: &str, manifests: &[&Manifest]) {
    let file = scratch(&format!("{variant}.yaml"));
    let stream: Vec<String> = manifests
        .iter()
        .map(|m| serde_json::to_string_pretty(&m.doc).expect("json"))
        .collect();
    // JSON is YAML: the validator reads it as it is.
    std::fs::write(&file, stream.join("\n---\n")).expect("write manifests");
    let mut cmd = Command::new(python());
    cmd.args(["-m", "kubernetes_validate", "--strict"]);
    for v in KUBERNETES_VERSIONS {
        cmd.args(["-k", v]);
    }
    let out = run(cmd.arg(&file)).expect("python runs");
    let _ = std::fs::remove_file(&file);
    let text = text_of(&out);
    assert!(
        out.status.success() && !text.contains("WARN") && !text.contains("ERROR"),
        "{variant}: schema validation failed:\n{text}"
    );
    let passed = text
        .lines()
        .filter(|l| l.starts_with("INFO") && l.contains(" passed for resource "))
        .count();
    assert_eq!(
        passed,
        manifests.len() * KUBERNETES_VERSIONS.len(),
        "{variant}: every manifest must pass against every version:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Checks on the rendered objects

fn labels_match(selector: &Value, labels: &Value) -> bool {
    let Some(selector) = selector.as_object() else {
        return false;
    };
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn containers(pod: &Value) -> Vec<&Value> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod[*k].as_array().into_iter().flatten())
        .collect()
}

fn env_value<'a>(container: &'a Value, name: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .and_then(|e| e["value"].as_str())
}

fn container_port(container: &Value, name: &str) -> Option<u16> {
    container["ports"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
}

fn prestop_sleep(container: &Value) -> u64 {
    container
        .pointer("/lifecycle/preStop/sleep/seconds")
        .and_then(Value::as_u64)
        .unwrap_or(0)
}

/// Hardening every container of every variant must have, by itself or from the pod.
fn check_container_hardening(what: &str, pod: &Value, c: &Value) {
    let name = str_at(c, "/name");
    let sc = &c["securityContext"];
    let psc = &pod["securityContext"];
    let ctx = format!("{what}: container {name}");
    assert_eq!(
        sc["allowPrivilegeEscalation"], false,
        "{ctx}: allowPrivilegeEscalation"
    );
    assert_eq!(
        sc["readOnlyRootFilesystem"], true,
        "{ctx}: readOnlyRootFilesystem"
    );
    assert!(
        sc["runAsNonRoot"] == true || psc["runAsNonRoot"] == true,
        "{ctx}: runAsNonRoot"
    );
    assert!(
        sc["capabilities"]["drop"]
            .as_array()
            .is_some_and(|d| d.iter().any(|c| c == "ALL")),
        "{ctx}: capabilities.drop [ALL]"
    );
    let seccomp = sc
        .pointer("/seccompProfile/type")
        .or_else(|| psc.pointer("/seccompProfile/type"));
    assert_eq!(
        seccomp,
        Some(&json!("RuntimeDefault")),
        "{ctx}: seccomp RuntimeDefault"
    );
    for kind in ["requests", "limits"] {
        for res in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][res].is_string(),
                "{ctx}: resources.{kind}.{res}"
            );
        }
    }
}

/// What a variant must satisfy beyond the schemas: references resolve, selectors select, and
/// the values that keygate's configuration dictates agree with it.
struct Checked<'a> {
    variant: &'a str,
    manifests: &'a [Manifest],
}

impl<'a> Checked<'a> {
    fn of_kind(&self, kind: &str) -> Vec<&'a Manifest> {
        self.manifests.iter().filter(|m| m.kind() == kind).collect()
    }

    fn named(&self, kind: &str, name: &str) -> Option<&'a Manifest> {
        self.manifests
            .iter()
            .find(|m| m.kind() == kind && m.name() == name)
    }

    fn unique_ids(&self) {
        let mut seen = BTreeSet::new();
        for m in self.manifests {
            let id = (
                str_at(&m.doc, "/apiVersion").to_string(),
                m.kind().to_string(),
                m.name().to_string(),
            );
            assert!(seen.insert(id.clone()), "{}: {id:?} twice", self.variant);
        }
    }

    /// The one Deployment, whose pods run keygate.
    fn deployment(&self) -> &'a Manifest {
        let d = self.of_kind("Deployment");
        assert_eq!(d.len(), 1, "{}: one Deployment", self.variant);
        d[0]
    }

    fn pod_labels(&self) -> &'a Value {
        &self.deployment().doc["spec"]["template"]["metadata"]["labels"]
    }

    fn references_resolve(&self) {
        let v = self.variant;
        let dep = &self.deployment().doc;
        let pod = &dep["spec"]["template"]["spec"];
        assert!(
            labels_match(&dep["spec"]["selector"]["matchLabels"], self.pod_labels()),
            "{v}: the Deployment's selector must match its pod labels"
        );
        let sa = str_at(pod, "/serviceAccountName");
        assert!(
            self.named("ServiceAccount", sa).is_some(),
            "{v}: ServiceAccount {sa}"
        );
        assert_eq!(
            pod["automountServiceAccountToken"], false,
            "{v}: keygate needs no API token"
        );
        let volumes: BTreeMap<&str, &Value> = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|vol| (str_at(vol, "/name"), vol))
            .collect();
        for vol in volumes.values() {
            if let Some(cm) = vol.pointer("/configMap/name").and_then(Value::as_str) {
                assert!(self.named("ConfigMap", cm).is_some(), "{v}: ConfigMap {cm}");
            }
        }
        for c in containers(pod) {
            check_container_hardening(v, pod, c);
            for m in c["volumeMounts"].as_array().into_iter().flatten() {
                let name = str_at(m, "/name");
                assert!(
                    volumes.contains_key(name),
                    "{v}: volume {name} is not defined"
                );
            }
            for from in c["envFrom"].as_array().into_iter().flatten() {
                if let Some(s) = from.pointer("/secretRef/name").and_then(Value::as_str) {
                    // Created out of band (base/secrets.env.example), never applied from here.
                    assert_eq!(s, "keygate-secrets", "{v}: the Secret the docs create");
                }
            }
        }
        // Services route to ports that keygate's pods declare.
        for svc in self.of_kind("Service") {
            assert!(
                labels_match(&svc.doc["spec"]["selector"], self.pod_labels()),
                "{v}: Service {} selects no pod",
                svc.name()
            );
            for port in svc.doc["spec"]["ports"].as_array().expect("ports") {
                let target = str_at(port, "/targetPort");
                assert!(
                    containers(pod)
                        .iter()
                        .any(|c| container_port(c, target).is_some()),
                    "{v}: Service {} targets port {target}, which no container declares",
                    svc.name()
                );
            }
        }
    }

    /// The keygate container: in `containers` (standalone) or a native sidecar.
    fn keygate(&self) -> &'a Value {
        let pod = &self.deployment().doc["spec"]["template"]["spec"];
        containers(pod)
            .into_iter()
            .find(|c| c["name"] == "keygate")
            .unwrap_or_else(|| panic!("{}: no container named keygate", self.variant))
    }

    /// keygate's configuration from the ConfigMap, loaded by keygate itself with the
    /// Deployment's environment: the placeholders in the Secret must be refused, and the file
    /// must load once real values replace them.
    fn keygate_settings(&self) -> keygate::config::Settings {
        let v = self.variant;
        let kg = self.keygate();
        let config_path = env_value(kg, "KEYGATE_CONFIG").expect("KEYGATE_CONFIG set");
        let config_dir = Path::new(config_path).parent().expect("a directory");
        let pod = &self.deployment().doc["spec"]["template"]["spec"];
        let config_volume = kg["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| Path::new(str_at(m, "/mountPath")) == config_dir)
            .map(|m| str_at(m, "/name"))
            .unwrap_or_else(|| panic!("{v}: nothing mounted at {}", config_dir.display()));
        let cm_name = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|vol| vol["name"] == config_volume)
            .map(|vol| str_at(vol, "/configMap/name"))
            .expect("the config volume is a ConfigMap");
        let file_name = Path::new(config_path)
            .file_name()
            .and_then(|f| f.to_str())
            .expect("a file name");
        let cm = self.named("ConfigMap", cm_name).expect("the ConfigMap");
        let toml = str_at(&cm.doc, &format!("/data/{file_name}"));
        let path = scratch(&format!("{v}-keygate.toml"));
        std::fs::write(&path, toml).expect("write config");

        let upstream = env_value(kg, "KEYGATE_UPSTREAM").expect("KEYGATE_UPSTREAM set");
        let parsed = url::Url::parse(upstream).expect("KEYGATE_UPSTREAM is a URL");
        assert!(matches!(parsed.scheme(), "http" | "https") && parsed.host().is_some());
        let mut env: HashMap<String, String> = kg["env"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((str_at(e, "/name").to_string(), e["value"].as_str()?.into())))
            .collect();
        // keygate resolves the upstream at startup; the cluster's Service name does not resolve
        // here, so any address stands in for it.
        env.insert("KEYGATE_UPSTREAM".into(), "http://127.0.0.1:3000".into());
        assert!(
            self.of_kind("Secret").is_empty(),
            "{v}: applying the tree must not overwrite the operator's Secret"
        );
        let template = read(&deploy_path("k8s/base/secrets.env.example"));
        for (k, val) in env_file(&template) {
            env.insert(k, val);
        }
        match keygate::app::configure(Some(&path), &env) {
            Ok(_) => panic!("{v}: keygate must refuse the Secret's placeholder values"),
            Err(p) => {
                for var in ["API_KEY_ENCRYPTION_SECRET", "CLERK_SECRET_KEY", "REDIS_URL"] {
                    assert!(
                        p.0.iter().any(|p| p.field.contains(var)),
                        "{v}: the placeholder {var} must be refused: {p}"
                    );
                }
            }
        }
        env.insert("API_KEY_ENCRYPTION_SECRET".into(), TEST_SECRET.into());
        env.insert("CLERK_SECRET_KEY".into(), TEST_CLERK_SECRET_KEY.into());
        env.insert("CLERK_PUBLISHABLE_KEY".into(), TEST_PUBLISHABLE_KEY.into());
        env.insert("REDIS_URL".into(), "redis://127.0.0.1:6379/0".into());
        let settings = keygate::app::configure(Some(&path), &env)
            .map(|c| c.settings)
            .unwrap_or_else(|p| panic!("{v}: the ConfigMap's keygate.toml does not load: {p}"));
        let _ = std::fs::remove_file(&path);
        settings
    }

    /// Listeners, ports, probes and the data directory agree with keygate's config.
    fn matches_keygate_config(&self, s: &keygate::config::Settings) {
        let v = self.variant;
        let kg = self.keygate();
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        assert_eq!(
            s.server.listen.ip(),
            any,
            "{v}: the public listener must face the pod network"
        );
        assert_eq!(
            s.server.admin_listen.ip(),
            any,
            "{v}: kubelet probes come from outside the pod"
        );
        assert_eq!(
            container_port(kg, "http"),
            Some(s.server.listen.port()),
            "{v}: port http"
        );
        assert_eq!(
            container_port(kg, "admin"),
            Some(s.server.admin_listen.port()),
            "{v}: port admin"
        );
        for (probe, path) in [
            ("startupProbe", "/health"),
            ("livenessProbe", "/health"),
            ("readinessProbe", "/ready"),
        ] {
            assert_eq!(
                kg[probe]["httpGet"]["path"], path,
                "{v}: {probe} must GET {path}"
            );
            assert_eq!(
                kg[probe]["httpGet"]["port"], "admin",
                "{v}: {probe} on the admin port"
            );
        }
        let data = kg["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| Path::new(str_at(m, "/mountPath")) == s.keys.data_dir);
        assert!(
            data,
            "{v}: keys.data_dir {} must be a volume (read-only root)",
            s.keys.data_dir.display()
        );
    }

    fn pod_spec(&self) -> &'a Value {
        &self.deployment().doc["spec"]["template"]["spec"]
    }

    fn termination_grace(&self) -> u64 {
        self.pod_spec()["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: terminationGracePeriodSeconds", self.variant))
    }
}

fn keygate_budget(s: &keygate::config::Settings) -> u64 {
    s.server.grace_period.as_secs() + s.server.shutdown_timeout.as_secs()
}

#[test]
fn kubernetes_variants_render_validate_and_match_keygate_config() {
    require_validators();
    let k8s = deploy_path("k8s");
    let alerts = yaml_file(&deploy_path("prometheus/alerts.yaml")).remove(0);
    for variant in ["sidecar", "standalone"] {
        let dir = k8s.join(variant);
        let manifests = render(&dir);
        if let Some(theirs) = kubectl_render(&dir) {
            assert_eq!(
                sorted_json(manifests.iter().map(|m| m.doc.clone())),
                sorted_json(theirs),
                "{variant}: kubectl kustomize renders something else than the listed files"
            );
        }
        let (custom, standard): (Vec<&Manifest>, Vec<&Manifest>) = manifests
            .iter()
            .partition(|m| CUSTOM_KINDS.contains(&m.kind()));
        validate_schemas(variant, &standard);

        for m in &custom {
            let obj = m.doc.as_object().expect("a mapping");
            let keys: BTreeSet<&str> = obj.keys().map(String::as_str).collect();
            assert_eq!(
                keys,
                BTreeSet::from(["apiVersion", "kind", "metadata", "spec"]),
                "{}: top-level keys",
                m.file.display()
            );
            assert_eq!(str_at(&m.doc, "/apiVersion"), "monitoring.coreos.com/v1");
            assert!(!m.name().is_empty());
            assert!(m.doc["spec"].as_object().is_some_and(|s| !s.is_empty()));
        }

        let c = Checked {
            variant,
            manifests: &manifests,
        };
        c.unique_ids();
        c.references_resolve();
        let settings = c.keygate_settings();
        c.matches_keygate_config(&settings);
        let kg = c.keygate();
        let pod = c.pod_spec();
        let grace = c.termination_grace();
        assert_eq!(
            pod["securityContext"]["runAsUser"].as_u64(),
            Some(image_uid()),
            "{variant}: pods run as the image's user"
        );

        match variant {
            "standalone" => {
                let dep = &c.deployment().doc;
                assert!(
                    dep["spec"]["replicas"].as_u64() >= Some(2),
                    "several replicas"
                );
                assert!(
                    pod["containers"]
                        .as_array()
                        .is_some_and(|cs| cs.contains(kg)),
                    "keygate is the pod's container"
                );
                let sleep = prestop_sleep(kg);
                assert!(sleep > 0, "a preStop sleep lets endpoint removal propagate");
                assert!(
                    sleep + keygate_budget(&settings) <= grace,
                    "terminationGracePeriodSeconds {grace} < preStop {sleep} + grace_period + \
                     shutdown_timeout {}",
                    keygate_budget(&settings)
                );
                assert!(grace <= 30, "fits Kubernetes' default 30 s budget");
                assert!(
                    env_value(kg, "KEYGATE_UPSTREAM").is_some(),
                    "the upstream Service is named"
                );
                let pdbs = c.of_kind("PodDisruptionBudget");
                assert_eq!(pdbs.len(), 1);
                assert_eq!(pdbs[0].doc["spec"]["minAvailable"], 1);
                assert!(labels_match(
                    &pdbs[0].doc["spec"]["selector"]["matchLabels"],
                    c.pod_labels()
                ));

                let monitors = c.of_kind("ServiceMonitor");
                assert_eq!(monitors.len(), 1);
                let sm = &monitors[0].doc["spec"];
                let services: Vec<&Manifest> = c
                    .of_kind("Service")
                    .into_iter()
                    .filter(|s| {
                        labels_match(&sm["selector"]["matchLabels"], &s.doc["metadata"]["labels"])
                    })
                    .collect();
                assert_eq!(
                    services.len(),
                    1,
                    "the ServiceMonitor selects exactly the admin Service"
                );
                let svc = &services[0].doc;
                for ep in sm["endpoints"].as_array().expect("endpoints") {
                    assert_eq!(ep["path"], "/metrics");
                    let port = str_at(ep, "/port");
                    let target = svc["spec"]["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|p| p["name"] == port)
                        .map(|p| str_at(p, "/targetPort"))
                        .unwrap_or_else(|| panic!("the admin Service has no port {port}"));
                    assert_eq!(
                        container_port(kg, target),
                        Some(settings.server.admin_listen.port()),
                        "Prometheus scrapes the admin listener"
                    );
                }

                let rules = c.of_kind("PrometheusRule");
                assert_eq!(rules.len(), 1);
                // Compared without printing both (they are long): the CR is alerts.yaml's
                // `groups:` indented under `spec:`.
                assert!(
                    rules[0].doc["spec"]["groups"] == alerts["groups"],
                    "standalone/prometheusrule.yaml and deploy/prometheus/alerts.yaml must hold \
                     the same groups"
                );
            }
            "sidecar" => {
                assert!(
                    pod["initContainers"]
                        .as_array()
                        .is_some_and(|cs| cs.contains(kg)),
                    "keygate is a native sidecar (an init container)"
                );
                assert_eq!(kg["restartPolicy"], "Always", "native sidecar");
                let upstream = env_value(kg, "KEYGATE_UPSTREAM").expect("KEYGATE_UPSTREAM");
                assert!(
                    upstream.starts_with("http://127.0.0.1:"),
                    "the server on loopback"
                );
                let servers = pod["containers"].as_array().expect("containers");
                assert_eq!(servers.len(), 1, "the MCP server");
                let server = &servers[0];
                assert_eq!(env_value(server, "AUTH_ENABLED"), Some("false"));
                assert!(
                    server.get("ports").is_none(),
                    "the MCP server declares no port: only keygate is reachable"
                );
                // Main containers stop first, then the sidecar drains.
                let budget = prestop_sleep(server) + keygate_budget(&settings);
                assert!(
                    budget <= grace,
                    "terminationGracePeriodSeconds {grace} < server preStop + keygate's {budget}"
                );
                let policies = c.of_kind("NetworkPolicy");
                assert_eq!(policies.len(), 1);
                let allowed: BTreeSet<&str> = policies[0].doc["spec"]["ingress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|r| r["ports"].as_array().into_iter().flatten())
                    .map(|p| str_at(p, "/port"))
                    .collect();
                assert_eq!(allowed, BTreeSet::from(["http", "admin"]));
                assert!(labels_match(
                    &policies[0].doc["spec"]["podSelector"]["matchLabels"],
                    c.pod_labels()
                ));
            }
            _ => unreachable!(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The container image

/// `KEY=VALUE` lines of an env file (comments and blanks skipped).
fn env_file(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            (k.trim().to_string(), v.trim().to_string())
        })
        .collect()
}

/// The Dockerfile's instructions of the final stage, as (INSTRUCTION, arguments).
fn runtime_stage(dockerfile: &str) -> Vec<(String, String)> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(t);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    let last_from = joined
        .iter()
        .rposition(|l| l.to_ascii_uppercase().starts_with("FROM "))
        .expect("a FROM");
    joined[last_from..]
        .iter()
        .map(|l| {
            let (i, rest) = l.split_once(' ').unwrap_or((l.as_str(), ""));
            (i.to_ascii_uppercase(), rest.trim().to_string())
        })
        .collect()
}

/// The numeric user of the image's final stage.
fn image_uid() -> u64 {
    let stage = runtime_stage(&read(&deploy_path("Dockerfile")));
    let users: Vec<&str> = stage
        .iter()
        .filter(|(i, _)| i == "USER")
        .map(|(_, a)| a.as_str())
        .collect();
    assert_eq!(users.len(), 1, "one USER in the runtime stage");
    users[0]
        .split(':')
        .next()
        .and_then(|u| u.parse().ok())
        .expect("a numeric USER, so Kubernetes' runAsNonRoot can check it")
}

#[test]
fn container_image_matches_the_config_it_ships() {
    let dockerfile = read(&deploy_path("Dockerfile"));
    let stage = runtime_stage(&dockerfile);
    let all = |instr: &str| -> Vec<&str> {
        stage
            .iter()
            .filter(|(i, _)| i == instr)
            .map(|(_, a)| a.as_str())
            .collect()
    };
    let env_line = all("ENV").join(" ");
    let env: HashMap<&str, &str> = env_line
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect();
    let config_path = *env.get("KEYGATE_CONFIG").expect("ENV KEYGATE_CONFIG");
    assert_eq!(config_path, "/etc/keygate/keygate.toml");
    assert!(
        all("COPY").contains(&"deploy/keygate.toml /etc/keygate/keygate.toml"),
        "the image ships deploy/keygate.toml as its config"
    );
    assert_eq!(all("ENTRYPOINT"), vec![r#"["keygate"]"#]);
    assert_eq!(all("EXPOSE"), vec!["8080 9090"]);
    assert_eq!(all("VOLUME"), vec![r#"["/var/lib/keygate"]"#]);
    assert_ne!(image_uid(), 0, "a non-root USER");
    assert_eq!(
        all("HEALTHCHECK").len(),
        1,
        "the health-check choice is stated"
    );

    // The baked-in config with the example environment: refused while it holds placeholders,
    // loaded once real values replace them, and agreeing with EXPOSE and VOLUME.
    let path = deploy_path("keygate.toml");
    let example = env_file(&read(&deploy_path(".env.example")));
    let names: BTreeSet<&str> = example.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "API_KEY_ENCRYPTION_SECRET",
            "CLERK_PUBLISHABLE_KEY",
            "CLERK_SECRET_KEY",
            "MCP_SERVER_URL",
            "REDIS_URL",
        ])
    );
    let mut vars: HashMap<String, String> = example.into_iter().collect();
    vars.insert("KEYGATE_UPSTREAM".into(), "http://127.0.0.1:3000".into());
    match keygate::app::configure(Some(&path), &vars) {
        Ok(_) => panic!("keygate must refuse the placeholders of .env.example"),
        Err(p) => {
            for var in [
                "API_KEY_ENCRYPTION_SECRET",
                "CLERK_PUBLISHABLE_KEY",
                "CLERK_SECRET_KEY",
            ] {
                assert!(
                    p.0.iter().any(|x| x.field.contains(var)),
                    "the placeholder {var} must be refused: {p}"
                );
            }
        }
    }
    vars.insert("API_KEY_ENCRYPTION_SECRET".into(), TEST_SECRET.into());
    vars.insert("CLERK_SECRET_KEY".into(), TEST_CLERK_SECRET_KEY.into());
    vars.insert("CLERK_PUBLISHABLE_KEY".into(), TEST_PUBLISHABLE_KEY.into());
    let s = keygate::app::configure(Some(&path), &vars)
        .map(|c| c.settings)
        .unwrap_or_else(|p| panic!("deploy/keygate.toml does not load: {p}"));
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    assert_eq!((s.server.listen.ip(), s.server.listen.port()), (any, 8080));
    assert_eq!(
        (s.server.admin_listen.ip(), s.server.admin_listen.port()),
        (any, 9090)
    );
    assert_eq!(s.keys.data_dir, PathBuf::from("/var/lib/keygate"));
    assert!(s.log.json, "containers log JSON");

    // Build output, history and filled-in secrets never enter the build context.
    let ignore = read(&repo().join(".dockerignore"));
    let entries: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for must in ["target/", ".git/", "config/dev/data/", "**/.env"] {
        assert!(entries.contains(must), ".dockerignore lacks {must}");
    }
}

#[test]
fn compose_file_wires_keygate_redis_and_the_upstream() {
    require_validators();
    let path = deploy_path("compose.yaml");
    let out = run(Command::new(python())
        .args([
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
        ])
        .arg(&path))
    .expect("python runs");
    assert!(
        out.status.success(),
        "compose.yaml does not follow the Compose specification:\n{}",
        text_of(&out)
    );
    let compose = yaml_file(&path).remove(0);
    let services = compose["services"].as_object().expect("services");
    for name in ["keygate", "redis", "upstream"] {
        assert!(services.contains_key(name), "service {name}");
    }
    let kg = &services["keygate"];
    let context = deploy_path(str_at(kg, "/build/context"));
    assert_eq!(
        context.canonicalize().expect("context exists"),
        repo().canonicalize().expect("repo"),
        "the build context is the repository root (.dockerignore applies there)"
    );
    assert!(context.join(str_at(kg, "/build/dockerfile")).is_file());
    assert_eq!(kg["env_file"], ".env", "the filled-in copy of .env.example");
    let upstream = url::Url::parse(str_at(kg, "/environment/KEYGATE_UPSTREAM")).expect("a URL");
    assert!(services.contains_key(upstream.host_str().expect("a host")));
    let example = env_file(&read(&deploy_path(".env.example")));
    let redis_url = example
        .iter()
        .find(|(k, _)| k == "REDIS_URL")
        .map(|(_, v)| url::Url::parse(v).expect("REDIS_URL is a URL"))
        .expect("REDIS_URL");
    assert!(services.contains_key(redis_url.host_str().expect("a host")));
    assert!(
        kg["volumes"].as_array().is_some_and(|v| v
            .iter()
            .any(|m| m.as_str().is_some_and(|m| m.ends_with(":/var/lib/keygate")))),
        "the embedded store's directory is a volume"
    );
    let grace = str_at(kg, "/stop_grace_period");
    let secs: u64 = grace.trim_end_matches('s').parse().expect("seconds");
    assert!(
        secs >= 25,
        "docker stop must wait for keygate's 5 s + 20 s drain"
    );
    assert_eq!(kg["read_only"], true);
    assert!(
        kg["ports"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p == "127.0.0.1:9090:9090")),
        "the admin port is published on loopback only"
    );
}

// ---------------------------------------------------------------------------------------------
// Dashboard and alert rules

/// Every PromQL expression of the dashboard: panel targets and variable queries.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    walk(&dashboard["templating"], &mut out);
    // The data source variable's `query` is a plugin type, not PromQL.
    out.retain(|q| q != "prometheus");
    out
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The `expr:` values of a rule file, read line by line: plain, quoted, or block scalars.
fn rule_exprs(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest.starts_with('|') || rest.starts_with('>') {
            let indent = indent_of(line);
            let mut block = Vec::new();
            while i < lines.len() && (lines[i].trim().is_empty() || indent_of(lines[i]) > indent) {
                block.push(lines[i].trim());
                i += 1;
            }
            out.push(block.join("\n").trim().to_string());
        } else {
            out.push(rest.trim_matches(|c| c == '\'' || c == '"').to_string());
        }
    }
    out
}

/// `keygate_…` identifiers in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut out = BTreeSet::new();
    let mut start = 0;
    while let Some(pos) = expr[start..].find("keygate_") {
        let at = start + pos;
        let mut end = at;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        if at == 0 || !ident(bytes[at - 1]) {
            out.insert(expr[at..end].to_string());
        }
        start = end;
    }
    out
}

fn dashboard() -> Value {
    serde_json::from_str(&read(&deploy_path("grafana/keygate.json"))).expect("dashboard JSON")
}

#[test]
fn dashboard_is_well_formed_and_shows_every_metric() {
    let d = dashboard();
    assert!(d["schemaVersion"].as_u64() >= Some(39));
    assert!(d["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(d["title"].is_string());
    let vars = d["templating"]["list"].as_array().expect("variables");
    let ds = vars
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a data source variable");
    assert_eq!(ds["name"], "datasource");
    assert_eq!(ds["query"], "prometheus");

    let panels = d["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut rows = 0;
    for p in panels {
        let title = str_at(p, "/title");
        assert!(
            ids.insert(p["id"].as_u64().expect("an id")),
            "{title}: duplicate id"
        );
        let pos = &p["gridPos"];
        let (x, w) = (pos["x"].as_u64().expect("x"), pos["w"].as_u64().expect("w"));
        assert!(
            x + w <= 24 && pos["h"].as_u64() > Some(0),
            "{title}: gridPos"
        );
        if p["type"] == "row" {
            rows += 1;
            continue;
        }
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "{title}: panels use the data source variable"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        let mut refs = BTreeSet::new();
        for t in targets {
            assert!(refs.insert(str_at(t, "/refId")), "{title}: duplicate refId");
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            let expr = str_at(t, "/expr");
            assert!(
                expr.contains(r#"job=~"$job""#),
                "{title}: filtered by $job: {expr}"
            );
        }
    }
    assert!(rows > 0 && panels.len() - rows >= EXPORTED_METRICS.len() / 2);

    let referenced: BTreeSet<String> = dashboard_queries(&d)
        .iter()
        .flat_map(|q| metric_names(q))
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .map_or(n.clone(), str::to_string)
        })
        .collect();
    for m in EXPORTED_METRICS {
        assert!(referenced.contains(m), "no dashboard panel shows {m}");
    }
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    require_promtool();
    let dir = deploy_path("prometheus");
    for args in [
        vec!["check", "rules", "alerts.yaml"],
        vec!["test", "rules", "alerts.test.yaml"],
    ] {
        let out = run(Command::new("promtool").args(&args).current_dir(&dir)).expect("promtool");
        assert!(
            out.status.success(),
            "promtool {}:\n{}",
            args.join(" "),
            text_of(&out)
        );
    }

    // The dashboard's queries, with Grafana's variables filled in, as recording rules: promtool
    // parses each one.
    let rules: Vec<Value> = dashboard_queries(&dashboard())
        .iter()
        .filter(|q| !q.starts_with("label_values("))
        .enumerate()
        .map(|(i, q)| {
            let q = q
                .replace("$__rate_interval", "5m")
                .replace("$job", ".*")
                .replace("$instance", ".*");
            json!({"record": format!("dashboard:query_{i}"), "expr": q})
        })
        .collect();
    assert!(!rules.is_empty());
    let file = scratch("dashboard-rules.yaml");
    std::fs::write(
        &file,
        json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string(),
    )
    .expect("write rules");
    let out = run(Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file))
    .expect("promtool");
    let _ = std::fs::remove_file(&file);
    assert!(
        out.status.success(),
        "dashboard queries:\n{}",
        text_of(&out)
    );
}

#[test]
fn alert_expressions_are_read_like_yaml_reads_them() {
    // The metric test below reads alerts.yaml line by line (no YAML parser in Rust here): make
    // sure that reading finds exactly the expressions a YAML parser does.
    let path = deploy_path("prometheus/alerts.yaml");
    let parsed = yaml_file(&path).remove(0);
    let normalize = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    let from_yaml: Vec<String> = parsed["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .map(|r| {
            for key in ["alert", "expr"] {
                assert!(r[key].is_string(), "a rule without {key}: {r}");
            }
            assert!(
                r["labels"]["severity"].is_string(),
                "{}: severity",
                r["alert"]
            );
            assert!(
                r["annotations"]["summary"].is_string(),
                "{}: summary",
                r["alert"]
            );
            normalize(str_at(r, "/expr"))
        })
        .collect();
    let from_lines: Vec<String> = rule_exprs(&read(&path))
        .iter()
        .map(|e| normalize(e))
        .collect();
    assert_eq!(from_lines, from_yaml);
}

#[tokio::test]
async fn dashboard_and_alerts_query_only_exported_metrics() {
    let data = std::env::temp_dir().join(format!(
        "keygate-deploy-{}-{}",
        std::process::id(),
        free_port()
    ));
    // The vault and a rate-limit rule are on, so their series exist and see traffic.
    let s = Stack::start(&format!(
        "[keys]\nencryption_secret = \"{TEST_SECRET}\"\ndata_dir = \"{}\"\n\n\
         [[rate_limits.rules]]\nname = \"per-user\"\nper = \"user\"\nrequests = 100\nperiod_secs = 60\n",
        data.display()
    ))
    .await;
    let session = s.key.sign(
        json!({"typ": "JWT"}),
        &keys::clerk_session_claims(&s.clerk.url(), "user_1", "sess_1"),
    );
    let stored = client()
        .post(s.gw.at("/api/keys"))
        .bearer_auth(&session)
        .json(&json!({"apiKey": "deploy-test-upstream-key"}))
        .send()
        .await
        .expect("store a key");
    assert_eq!(stored.status(), 200);
    let token = s.access_token("user_1");
    assert_eq!(rpc(s.gw.at("/mcp"), Some(&token)).await.status(), 200);
    assert_eq!(rpc(s.gw.at("/mcp"), Some(&token)).await.status(), 200);
    assert_eq!(rpc(s.gw.at("/mcp"), None).await.status(), 401);
    let discovery = client()
        .get(s.gw.at("/.well-known/oauth-protected-resource/mcp"))
        .send()
        .await
        .expect("discovery");
    assert_eq!(discovery.status(), 200);

    let metrics = client()
        .get(format!("{}/metrics", s.gw.admin_url))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let types: BTreeMap<&str, &str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();

    let mut wanted: BTreeMap<String, BTreeSet<&str>> = BTreeMap::new();
    for q in dashboard_queries(&dashboard()) {
        for n in metric_names(&q) {
            wanted
                .entry(n)
                .or_default()
                .insert("deploy/grafana/keygate.json");
        }
    }
    for e in rule_exprs(&read(&deploy_path("prometheus/alerts.yaml"))) {
        for n in metric_names(&e) {
            wanted
                .entry(n)
                .or_default()
                .insert("deploy/prometheus/alerts.yaml");
        }
    }
    assert!(wanted.len() >= EXPORTED_METRICS.len(), "{wanted:?}");

    let mut missing = Vec::new();
    for (name, files) in &wanted {
        // Series of the Redis clients exist only with Redis: prometheus.rs checks them against
        // a keygate that has it.
        let found = match types.get(name.as_str()) {
            Some(_) => true,
            None if name.starts_with("keygate_redis_") => true,
            // A histogram's series carry suffixes its TYPE line does not.
            None => ["_bucket", "_sum", "_count"].iter().any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| types.get(base) == Some(&"histogram"))
            }),
        };
        if !found {
            missing.push(format!("{name} (in {files:?})"));
        }
    }
    assert!(
        missing.is_empty(),
        "queried but not exported by keygate:\n  {}\nexported:\n{types:#?}",
        missing.join("\n  ")
    );
    let _ = std::fs::remove_dir_all(&data);
}
