{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "vigil.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, suffixed with the chart name unless
the release name already contains it.
*/}}
{{- define "vigil.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "vigil.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vigil.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vigil.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vigil.labels" -}}
helm.sh/chart: {{ include "vigil.chart" . }}
{{ include "vigil.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/component: node-agent
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "vigil.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vigil.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "vigil.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/*
Port of the metrics endpoint, taken from config.agent.metrics_addr so that the
container port, the Service and the scrape annotations can never disagree with
what the agent binds. Fails on a loopback address: Prometheus could not reach it.
*/}}
{{- define "vigil.metricsPort" -}}
{{- $agent := .Values.config.agent | default dict }}
{{- $addr := required "config.agent.metrics_addr is required (e.g. 0.0.0.0:9464)" $agent.metrics_addr | toString }}
{{- if or (hasPrefix "127." $addr) (hasPrefix "[::1]" $addr) (hasPrefix "localhost" $addr) }}
{{- fail (printf "config.agent.metrics_addr %q listens on loopback only; Prometheus and the Service cannot reach it. Use 0.0.0.0:PORT or [::]:PORT." $addr) }}
{{- end }}
{{- $port := regexFind ":[0-9]+$" $addr | trimPrefix ":" }}
{{- if not $port }}
{{- fail (printf "config.agent.metrics_addr %q must be an address with a port, e.g. 0.0.0.0:9464" $addr) }}
{{- end }}
{{- $port }}
{{- end }}

{{/*
One TOML value. Strings are written as JSON strings, which are valid TOML basic
strings; YAML numbers arrive as float64: whole ones are written as integers
(most numeric fields of the agent's config are integers; values.schema.json
says which), others as TOML floats (actuation.admission_floor, max_shed_step).
Call with (dict "value" V "path" "config.section.key").
*/}}
{{- define "vigil.tomlValue" -}}
{{- $v := .value }}
{{- if kindIs "string" $v }}
{{- toJson $v }}
{{- else if kindIs "bool" $v }}
{{- ternary "true" "false" $v }}
{{- else if or (kindIs "float64" $v) (kindIs "float32" $v) }}
{{- if eq (float64 (int64 $v)) (float64 $v) }}
{{- int64 $v }}
{{- else }}
{{- toJson $v }}
{{- end }}
{{- else if or (kindIs "int" $v) (kindIs "int64" $v) (kindIs "int32" $v) (kindIs "uint64" $v) }}
{{- $v }}
{{- else if kindIs "slice" $v }}
{{- $path := .path }}
{{- $items := list }}
{{- range $i, $e := $v }}
{{- $items = append $items (include "vigil.tomlValue" (dict "value" $e "path" (printf "%s[%d]" $path $i))) }}
{{- end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else }}
{{- fail (printf "%s: values of kind %s cannot be written to the agent's TOML config" .path (kindOf $v)) }}
{{- end }}
{{- end }}

{{/*
The agent's TOML config from .Values.config: one [table] per key, one
`key = value` line per entry. Null entries are left out (the agent's default
applies), which is how optional fields such as agent.event_log stay unset.
*/}}
{{- define "vigil.configToml" -}}
{{- range $section, $fields := .Values.config }}
{{- if not (kindIs "map" $fields) }}
{{- fail (printf "config.%s must be a map (it becomes the TOML table [%s]), got %s" $section $section (kindOf $fields)) }}
{{- end }}
[{{ $section }}]
{{- range $key, $value := $fields }}
{{- if not (kindIs "invalid" $value) }}
{{ $key }} = {{ include "vigil.tomlValue" (dict "value" $value "path" (printf "config.%s.%s" $section $key)) }}
{{- end }}
{{- end }}
{{ end }}
{{- end }}

{{/*
The PriorityClass of the pods: priorityClassName when set, else the class
the chart creates (priorityClass.create), else none.
*/}}
{{- define "vigil.priorityClassName" -}}
{{- if .Values.priorityClassName }}
{{- .Values.priorityClassName }}
{{- else if .Values.priorityClass.create }}
{{- default (include "vigil.fullname" .) .Values.priorityClass.name }}
{{- end }}
{{- end }}

{{/*
Port of config.receiver.listen (the agent's default when unset).
*/}}
{{- define "vigil.receiverPort" -}}
{{- $receiver := .Values.config.receiver | default dict }}
{{- regexFind "[0-9]+$" (toString ($receiver.listen | default "127.0.0.1:4317")) }}
{{- end }}

{{/*
"true" when the agent will run its OTLP span receiver: config.receiver is
enabled and extraEnv gives it a traces endpoint to forward to
(OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) that
OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none do not turn off, the same
rule the agent applies at start (agent/src/export/otlp.rs).
*/}}
{{- define "vigil.spanReceiverRuns" -}}
{{- $receiver := .Values.config.receiver | default dict }}
{{- $enabled := ne (toString (index $receiver "enabled")) "false" }}
{{- $endpoint := false }}
{{- $off := false }}
{{- range .Values.extraEnv }}
{{- if has .name (list "OTEL_EXPORTER_OTLP_ENDPOINT" "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") }}
{{- $endpoint = true }}
{{- end }}
{{- if and (eq .name "OTEL_SDK_DISABLED") (eq (lower (toString .value)) "true") }}
{{- $off = true }}
{{- end }}
{{- if and (eq .name "OTEL_TRACES_EXPORTER") (eq (lower (toString .value)) "none") }}
{{- $off = true }}
{{- end }}
{{- end }}
{{- and $enabled $endpoint (not $off) }}
{{- end }}

{{/*
Relabelling shared by the ServiceMonitor and the PodMonitor (values.yaml,
"Prometheus Operator"): the agent pod's identity and node as agent_* and
node, then the target labels that would overwrite or stand in for a
workload's dropped.
*/}}
{{- define "vigil.monitorRelabelings" -}}
- sourceLabels: [__meta_kubernetes_pod_node_name]
  targetLabel: node
- sourceLabels: [__meta_kubernetes_namespace]
  targetLabel: agent_namespace
- sourceLabels: [__meta_kubernetes_pod_name]
  targetLabel: agent_pod
- action: labeldrop
  regex: (namespace|pod|container|service|endpoint)
{{- end }}
