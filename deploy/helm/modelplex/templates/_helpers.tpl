{{/* ===================== names and labels ===================== */}}

{{- define "modelplex.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modelplex.fullname" -}}
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

{{- define "modelplex.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <fullname>-<suffix>, kept within 63 characters. Call with (list $ "suffix"). */}}
{{- define "modelplex.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "modelplex.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A model id as a DNS label fragment: "llama-3.1-8b-instruct" -> "llama-3-1-8b-instruct". */}}
{{- define "modelplex.modelSlug" -}}
{{- regexReplaceAll "[^a-z0-9-]+" (lower .) "-" | trimAll "-" | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* Names of a model's objects. Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.textName" -}}
{{- include "modelplex.componentName" (list .root (printf "text-%s" (include "modelplex.modelSlug" .model.id))) }}
{{- end }}
{{- define "modelplex.vllmName" -}}
{{- include "modelplex.componentName" (list .root (printf "vllm-%s" (include "modelplex.modelSlug" .model.id))) }}
{{- end }}
{{- define "modelplex.tritonName" -}}
{{- include "modelplex.componentName" (list .root (printf "triton-%s" (include "modelplex.modelSlug" .model.id))) }}
{{- end }}

{{/* In-cluster DNS name of a Service. Call with (list $ "service-name"). */}}
{{- define "modelplex.serviceHost" -}}
{{- $root := index . 0 }}
{{- printf "%s.%s.svc.%s" (index . 1) $root.Release.Namespace $root.Values.clusterDomain }}
{{- end }}

{{/* Common labels. Call with (list $ "component"). */}}
{{- define "modelplex.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ include "modelplex.chart" $root }}
{{ include "modelplex.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: modelplex
{{- end }}

{{/* Selector labels. Call with (list $ "component"). */}}
{{- define "modelplex.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "modelplex.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Selector labels of one model's pods. Call with (dict "root" $ "model" $m "component" "text"). */}}
{{- define "modelplex.modelSelectorLabels" -}}
{{- include "modelplex.selectorLabels" (list .root .component) }}
modelplex.io/model: {{ include "modelplex.modelSlug" .model.id }}
{{- end }}

{{- define "modelplex.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "modelplex.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* ===================== images and pod plumbing ===================== */}}

{{/* A Modelplex image reference. Call with (list $ .Values.edge.image). */}}
{{- define "modelplex.image" -}}
{{- $root := index . 0 }}
{{- $img := index . 1 }}
{{- $tag := $img.tag | default $root.Values.image.tag | default $root.Chart.AppVersion }}
{{- $repo := $img.repository }}
{{- with $root.Values.global.imageRegistry }}
{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo }}
{{- end }}
{{- if hasPrefix "sha256:" $tag }}
{{- printf "%s@%s" $repo $tag }}
{{- else }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{- define "modelplex.imagePullSecrets" -}}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Prometheus scrape annotations. Call with (list $ port "/metrics"). */}}
{{- define "modelplex.metricsAnnotations" -}}
{{- $root := index . 0 -}}
{{- if $root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ index . 1 | quote }}
prometheus.io/path: {{ index . 2 | quote }}
{{- end }}
{{- end }}

{{/* gRPC probes (Kubernetes-native, grpc.health.v1). Call with (dict "port" 50051 "startupSeconds" 300). */}}
{{- define "modelplex.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: {{ div (.startupSeconds | default 60 | int) 5 | max 1 }}
readinessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 20
  timeoutSeconds: 5
  failureThreshold: 3
{{- end }}

{{/* ===================== models ===================== */}}

{{/* "true" when the model is enabled (enabled defaults to true). */}}
{{- define "modelplex.modelEnabled" -}}
{{- if or (not (hasKey . "enabled")) .enabled }}true{{ end }}
{{- end }}

{{/* "true" when the chart runs a text backend for the model. */}}
{{- define "modelplex.hasTextBackend" -}}
{{- if and (include "modelplex.modelEnabled" .) (eq (.modality | default "text") "text") (not .backend) }}true{{ end }}
{{- end }}

{{/* "true" when the chart runs a vLLM / Triton engine for the model. */}}
{{- define "modelplex.hasVllm" -}}
{{- $e := .engine | default dict }}
{{- if and (include "modelplex.hasTextBackend" .) (eq ($e.kind | default "") "openai") (dig "vllm" "enabled" false $e) }}true{{ end }}
{{- end }}
{{- define "modelplex.hasTriton" -}}
{{- $e := .engine | default dict }}
{{- if and (include "modelplex.hasTextBackend" .) (eq ($e.kind | default "") "triton") (dig "triton" "enabled" false $e) }}true{{ end }}
{{- end }}

{{/* The gRPC target the catalog advertises for a model. Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.modelBackend" -}}
{{- if .model.backend }}
{{- .model.backend }}
{{- else }}
{{- printf "%s:%v" (include "modelplex.serviceHost" (list .root (include "modelplex.textName" .))) .root.Values.text.port }}
{{- end }}
{{- end }}

{{/* The upstream URL a text backend talks to (openai/triton). Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.upstreamUrl" -}}
{{- $e := .model.engine }}
{{- if include "modelplex.hasVllm" .model }}
{{- printf "http://%s:%v/v1" (include "modelplex.serviceHost" (list .root (include "modelplex.vllmName" .))) .root.Values.engines.vllm.port }}
{{- else if include "modelplex.hasTriton" .model }}
{{- printf "%s:%v" (include "modelplex.serviceHost" (list .root (include "modelplex.tritonName" .))) .root.Values.engines.triton.grpcPort }}
{{- else }}
{{- $e.upstreamUrl | default "" }}
{{- end }}
{{- end }}

{{/* The model name the upstream knows. Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.upstreamModel" -}}
{{- $e := .model.engine }}
{{- if include "modelplex.hasVllm" .model }}
{{- $e.upstreamModel | default .model.id }}
{{- else if include "modelplex.hasTriton" .model }}
{{- dig "triton" "modelName" "" $e | default $e.upstreamModel | default .model.id }}
{{- else }}
{{- $e.upstreamModel | default .model.id }}
{{- end }}
{{- end }}

{{/* Fails the render on an inconsistent model entry. */}}
{{- define "modelplex.validateModel" -}}
{{- $m := . }}
{{- if not $m.id }}{{ fail "models[]: every model needs an id" }}{{ end }}
{{- $modality := $m.modality | default "text" }}
{{- if not (has $modality (list "text" "embeddings" "images" "videos" "speech" "transcription")) }}
{{- fail (printf "model %s: unknown modality %q" $m.id $modality) }}
{{- end }}
{{- if and (ne $modality "text") (not $m.backend) }}
{{- fail (printf "model %s: the chart runs text backends only; set backend: <host:port> for modality %s" $m.id $modality) }}
{{- end }}
{{- if include "modelplex.hasTextBackend" $m }}
{{- $e := $m.engine | default dict }}
{{- $kind := $e.kind | default "" }}
{{- if not (has $kind (list "llamacpp" "openai" "triton")) }}
{{- fail (printf "model %s: engine.kind must be llamacpp, openai or triton (got %q)" $m.id $kind) }}
{{- end }}
{{- if and (eq $kind "openai") (not (include "modelplex.hasVllm" $m)) (not $e.upstreamUrl) }}
{{- fail (printf "model %s: engine.kind openai needs engine.vllm.enabled or engine.upstreamUrl" $m.id) }}
{{- end }}
{{- if and (eq $kind "openai") (include "modelplex.hasVllm" $m) (not (dig "vllm" "hfModel" "" $e)) }}
{{- fail (printf "model %s: engine.vllm.hfModel is required" $m.id) }}
{{- end }}
{{- if and (eq $kind "triton") (not (include "modelplex.hasTriton" $m)) (not $e.upstreamUrl) }}
{{- fail (printf "model %s: engine.kind triton needs engine.triton.enabled or engine.upstreamUrl" $m.id) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The model's catalog entry as YAML. Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.catalogEntry" -}}
{{- $m := .model }}
{{- $e := $m.engine | default dict }}
{{- $kind := $e.kind | default "" }}
{{- $settings := dict }}
{{- if eq $kind "llamacpp" }}
{{- with $e.modelPath }}{{ $_ := set $settings "model_path" . }}{{ end }}
{{- else if or (eq $kind "openai") (eq $kind "triton") }}
{{- $_ := set $settings "upstream_url" (include "modelplex.upstreamUrl" .) }}
{{- $_ := set $settings "upstream_model" (include "modelplex.upstreamModel" .) }}
{{- if eq $kind "triton" }}{{ $_ := set $settings "triton_flavor" ($e.flavor | default "vllm") }}{{ end }}
{{- end }}
{{- $entry := dict "id" $m.id "modality" ($m.modality | default "text") "backend" (include "modelplex.modelBackend" .) }}
{{- with $m.aliases }}{{ $_ := set $entry "aliases" . }}{{ end }}
{{- if $kind }}{{ $_ := set $entry "engine" (dict "kind" $kind "settings" $settings) }}{{ end }}
{{- with $m.capabilities }}{{ $_ := set $entry "capabilities" . }}{{ end }}
{{- with $m.contextLength }}{{ $_ := set $entry "context_length" (int64 .) }}{{ end }}
{{- $_ := set $entry "owned_by" ($m.ownedBy | default "modelplex") }}
{{- with $m.created }}{{ $_ := set $entry "created" (int64 .) }}{{ end }}
{{- with $m.description }}{{ $_ := set $entry "description" . }}{{ end }}
{{- toYaml $entry }}
{{- end }}

{{/* The catalog file (ConfigMap content). */}}
{{- define "modelplex.catalogYaml" -}}
{{- $entries := list }}
{{- range $m := .Values.models }}
{{- if include "modelplex.modelEnabled" $m }}
{{- include "modelplex.validateModel" $m }}
{{- $entries = append $entries (include "modelplex.catalogEntry" (dict "root" $ "model" $m) | fromYaml) }}
{{- end }}
{{- end }}
{{- $seen := dict }}
{{- range $m := .Values.models }}
{{- if include "modelplex.hasTextBackend" $m }}
{{- $slug := include "modelplex.modelSlug" $m.id }}
{{- if hasKey $seen $slug }}
{{- fail (printf "models %s and %s map to the same object name suffix %q; rename one" (get $seen $slug) $m.id $slug) }}
{{- end }}
{{- $_ := set $seen $slug $m.id }}
{{- end }}
{{- end }}
{{- range .Values.catalog.extraEntries }}
{{- $entries = append $entries . }}
{{- end }}
{{- toYaml (dict "models" $entries) }}
{{- end }}

{{/*
Shutdown, one rule for every pod: on termination the preStop delay lets endpoints and
load balancers stop routing to the pod, then SIGTERM starts the drain (graceSeconds, also
MODELPLEX_GRACE_SECONDS), and the kubelet waits for both plus a margin before SIGKILL.
*/}}
{{- define "modelplex.terminationGrace" -}}
{{- add (int .graceSeconds) (int .preStopSeconds) 10 -}}
{{- end -}}

{{- define "modelplex.preStop" -}}
{{- if .preStopSeconds }}
lifecycle:
  preStop:
    exec:
      command: ["python", "-c", "import time; time.sleep({{ int .preStopSeconds }})"]
{{- end }}
{{- end -}}
