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

{{/* A model's modality (text when unset). */}}
{{- define "modelplex.modality" -}}
{{- .modality | default "text" }}
{{- end }}

{{/* The `backends` row of a model's modality (empty when the chart has none). Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.backendRow" -}}
{{- $modality := include "modelplex.modality" .model }}
{{- $row := get .root.Values.backends $modality }}
{{- if $row }}
{{- /* The row over backendDefaults, key by key (and one level down: a row's partial `shutdown` keeps the
     defaults' other keys). Not sprig's merge: it would take a row's 0 (replicaCount: 0) for "unset". */}}
{{- $merged := deepCopy $row }}
{{- range $key, $default := $.root.Values.backendDefaults }}
{{- if not (hasKey $merged $key) }}
{{- $_ := set $merged $key (deepCopy $default) }}
{{- else if and (kindIs "map" $default) (kindIs "map" (get $merged $key)) }}
{{- $inner := get $merged $key }}
{{- range $k, $v := $default }}{{ if not (hasKey $inner $k) }}{{ $_ := set $inner $k (deepCopy $v) }}{{ end }}{{ end }}
{{- end }}
{{- end }}
{{- /* The registry's naming convention (tests/deploy checks every row against the registry). */}}
{{- if not $merged.package }}{{ $_ := set $merged "package" (printf "modelplex_%s" $modality) }}{{ end }}
{{- if not $merged.envPrefix }}{{ $_ := set $merged "envPrefix" (printf "MODELPLEX_%s_" (upper $modality)) }}{{ end }}
{{- toYaml $merged }}
{{- else }}
{{- toYaml dict }}
{{- end }}
{{- end }}

{{/* Names of a model's objects: <release>-<modality>-<slug>. Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.backendName" -}}
{{- include "modelplex.componentName" (list .root (printf "%s-%s" (include "modelplex.modality" .model) (include "modelplex.modelSlug" .model.id))) }}
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

{{/* "true" when the chart runs a backend for the model: enabled, not a LoRA adapter (its base's backend
serves it), no external `backend:`, and its modality has a `backends` row with an image.
Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.hasBackend" -}}
{{- $row := include "modelplex.backendRow" . | fromYaml }}
{{- if and (include "modelplex.modelEnabled" .model) (not .model.adapter) (not .model.backend) (dig "image" "repository" "" $row) }}true{{ end }}
{{- end }}

{{/* "true" when the chart runs a vLLM / Triton engine for the model. Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.hasVllm" -}}
{{- $e := .model.engine | default dict }}
{{- if and (include "modelplex.hasBackend" .) (eq ($e.kind | default "") "openai") (dig "vllm" "enabled" false $e) }}true{{ end }}
{{- end }}
{{/* "true" when the model's vLLM publishes its KV-cache events (a text model, engines.vllm.kvEvents.enabled
unless the model's engine.vllm.kvEvents says otherwise): its backends subscribe (modelplex_kit/pools/kv_events.py). */}}
{{- define "modelplex.vllmKvEvents" -}}
{{- $e := .model.engine | default dict }}
{{- $on := .root.Values.engines.vllm.kvEvents.enabled }}
{{- if hasKey ($e.vllm | default dict) "kvEvents" }}{{ $on = $e.vllm.kvEvents }}{{ end }}
{{- if and (include "modelplex.hasVllm" .) (eq (.model.modality | default "text") "text") $on }}true{{ end }}
{{- end }}
{{/* Ids of the enabled adapter entries whose base is this model, comma-separated. Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.adaptersOf" -}}
{{- $ids := list }}
{{- range $a := .root.Values.models }}
{{- if and $a.adapter (include "modelplex.modelEnabled" $a) (eq (toString $a.adapter.base) (toString $.model.id)) }}
{{- $ids = append $ids $a.id }}
{{- end }}
{{- end }}
{{- join "," $ids }}
{{- end }}
{{/* The LoRA settings of a text model's chart-run vLLM as YAML (enabled, maxLoras, maxLoraRank, maxCpuLoras,
volume): engines.vllm.lora with the model's engine.vllm.lora over it key by key, enabled whenever an adapter
entry names the model as its base. Empty for any other model. Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.vllmLora" -}}
{{- if and (include "modelplex.hasVllm" .) (eq (include "modelplex.modality" .model) "text") }}
{{- $lora := deepCopy (.root.Values.engines.vllm.lora | default dict) }}
{{- $own := dig "vllm" "lora" dict (.model.engine | default dict) }}
{{- range $key, $value := $own }}{{ $_ := set $lora $key $value }}{{ end }}
{{- with include "modelplex.adaptersOf" . }}
{{- if and (hasKey $own "enabled") (not $own.enabled) }}
{{- fail (printf "model %s: engine.vllm.lora.enabled is false, but the adapters %s name it as their base; remove the setting (an adapter turns LoRA on) or the adapters" $.model.id .) }}
{{- end }}
{{- $_ := set $lora "enabled" true }}
{{- end }}
{{- if $lora.enabled }}
{{- if lt (int $lora.maxLoras) 2 }}
{{- fail (printf "model %s: engine.vllm.lora.maxLoras must be at least 2 (with zeroAdapter, base-model requests take one)" .model.id) }}
{{- end }}
{{- if lt (int $lora.maxCpuLoras) (int $lora.maxLoras) }}
{{- fail (printf "model %s: engine.vllm.lora.maxCpuLoras (%d) must be at least maxLoras (%d), as vLLM requires" .model.id (int $lora.maxCpuLoras) (int $lora.maxLoras)) }}
{{- end }}
{{- toYaml $lora }}
{{- end }}
{{- end }}
{{- end }}
{{- define "modelplex.hasTriton" -}}
{{- $e := .model.engine | default dict }}
{{- if and (include "modelplex.hasBackend" .) (eq ($e.kind | default "") "triton") (dig "triton" "enabled" false $e) }}true{{ end }}
{{- end }}

{{/* The gRPC target the catalog advertises for a model. Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.modelBackend" -}}
{{- if .model.backend }}
{{- .model.backend }}
{{- else }}
{{- $row := include "modelplex.backendRow" . | fromYaml }}
{{- printf "%s:%v" (include "modelplex.serviceHost" (list .root (include "modelplex.backendName" .))) $row.port }}
{{- end }}
{{- end }}

{{/*
A model's engine settings as YAML: the ONE dict both the catalog entry and the backend's
environment come from (each key becomes <envPrefix><KEY>, as `make run`'s launcher does).
The model's engine.settings over the modality's backends.<m>.engineDefaults.<kind>; the
upstream of a chart-managed vLLM/Triton engine is always the chart's Service; openai/triton
engines name the upstream model after the model id unless told otherwise.
Call with (dict "root" $ "model" $m).
*/}}
{{- define "modelplex.engineSettings" -}}
{{- $m := .model }}
{{- $e := $m.engine | default dict }}
{{- $kind := $e.kind | default "" }}
{{- $row := include "modelplex.backendRow" . | fromYaml }}
{{- $s := merge (deepCopy ($e.settings | default dict)) (deepCopy (dig "engineDefaults" $kind dict $row)) }}
{{- if include "modelplex.hasVllm" . }}
{{- $_ := set $s "upstream_url" (printf "http://%s:%v/v1" (include "modelplex.serviceHost" (list .root (include "modelplex.vllmName" .))) .root.Values.engines.vllm.port) }}
{{- else if include "modelplex.hasTriton" . }}
{{- $_ := set $s "upstream_url" (printf "%s:%v" (include "modelplex.serviceHost" (list .root (include "modelplex.tritonName" .))) .root.Values.engines.triton.grpcPort) }}
{{- else if and (not $s.upstream_url) (dig "pool" "selector" "" $m) }}
{{- $host := include "modelplex.serviceHost" (list .root (include "modelplex.poolServiceName" .)) }}
{{- $_ := set $s "upstream_url" (eq $kind "triton" | ternary (printf "%s:%v" $host $m.pool.port) (printf "http://%s:%v/v1" $host $m.pool.port)) }}
{{- else if and (not $s.upstream_url) (dig "pool" "inferencePool" "" $m) }}
{{- /* The scheme and path the replicas are called with; each replica's address replaces the host. */}}
{{- $_ := set $s "upstream_url" (eq $kind "triton" | ternary $m.pool.inferencePool (printf "http://%s/v1" $m.pool.inferencePool)) }}
{{- end }}
{{- range $key, $value := include "modelplex.poolSettings" . | fromYaml }}
{{- $_ := set $s $key $value }}
{{- end }}
{{- if and (has $kind (list "openai" "triton")) (not $s.upstream_model) }}
{{- $_ := set $s "upstream_model" ((eq (include "modelplex.hasTriton" .) "true") | ternary (dig "triton" "modelName" "" $e) "" | default $m.id) }}
{{- end }}
{{- toYaml $s }}
{{- end }}

{{/* A settings value as an env var value: strings as they are, anything else as JSON (1000000, not 1e+06). */}}
{{- define "modelplex.envValue" -}}
{{- if kindIs "string" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* Fails the render on an inconsistent adapter entry: its base must be an enabled text model of `models`
served by a chart-run vLLM, and the adapter's rank within that vLLM's maxLoraRank.
Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.validateAdapter" -}}
{{- $m := .model }}
{{- $a := $m.adapter }}
{{- if not $a.base }}{{ fail (printf "model %s: adapter.base is required (the id of the model it adapts)" $m.id) }}{{ end }}
{{- if not $a.source }}{{ fail (printf "model %s: adapter.source is required (a PEFT folder on the vLLM pods, or a Hugging Face repo id)" $m.id) }}{{ end }}
{{- $base := dict }}
{{- range $b := .root.Values.models }}{{ if eq (toString $b.id) (toString $a.base) }}{{ $base = $b }}{{ end }}{{ end }}
{{- if not $base.id }}
{{- fail (printf "model %s: adapter.base %q is not in models; list the base model (a text model on a chart-run vLLM) too" $m.id $a.base) }}
{{- end }}
{{- if $base.adapter }}
{{- fail (printf "model %s: adapter.base %q is an adapter itself; name the model it adapts" $m.id $a.base) }}
{{- end }}
{{- if not (include "modelplex.modelEnabled" $base) }}
{{- fail (printf "model %s: its base %q is disabled; enable it or disable the adapter" $m.id $a.base) }}
{{- end }}
{{- if ne (include "modelplex.modality" $base) "text" }}
{{- fail (printf "model %s: its base %q is a %s model; LoRA adapters are of text models" $m.id $a.base (include "modelplex.modality" $base)) }}
{{- end }}
{{- if ne (include "modelplex.modality" $m) "text" }}
{{- fail (printf "model %s: an adapter is a text model (its modality comes from its base)" $m.id) }}
{{- end }}
{{- $bctx := dict "root" .root "model" $base }}
{{- if not (include "modelplex.hasVllm" $bctx) }}
{{- fail (printf "model %s: its base %q is not served by a vLLM this chart runs (engine.kind openai with engine.vllm.enabled); adapters are loaded into the base's vLLM" $m.id $a.base) }}
{{- end }}
{{- $lora := include "modelplex.vllmLora" $bctx | fromYaml }}
{{- if and $a.rank (gt (int $a.rank) (int $lora.maxLoraRank)) }}
{{- fail (printf "model %s: adapter.rank %d exceeds its base %s's maxLoraRank %d; raise engines.vllm.lora.maxLoraRank (or the base's engine.vllm.lora.maxLoraRank)" $m.id (int $a.rank) $a.base (int $lora.maxLoraRank)) }}
{{- end }}
{{- end }}

{{/* Fails the render on an inconsistent model entry. Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.validateModel" -}}
{{- $m := .model }}
{{- if not $m.id }}{{ fail "models[]: every model needs an id" }}{{ end }}
{{- if $m.adapter }}
{{- include "modelplex.validateAdapter" . }}
{{- else }}
{{- $modality := include "modelplex.modality" $m }}
{{- $row := include "modelplex.backendRow" . | fromYaml }}
{{- if not (hasKey .root.Values.backends $modality) }}
{{- fail (printf "model %s: unknown modality %q (the chart knows %s)" $m.id $modality (keys .root.Values.backends | sortAlpha | join ", ")) }}
{{- end }}
{{- range $caller := ($row.allowFrom | default list) }}
{{- if not (hasKey $.root.Values.backends $caller) }}
{{- fail (printf "backends.%s.allowFrom: unknown modality %q (the chart knows %s)" $modality $caller (keys $.root.Values.backends | sortAlpha | join ", ")) }}
{{- end }}
{{- end }}
{{- if and (not $m.backend) (not (dig "image" "repository" "" $row)) }}
{{- fail (printf "model %s: backends.%s has no image; set it or give the model backend: <host:port>" $m.id $modality) }}
{{- end }}
{{- if include "modelplex.hasBackend" . }}
{{- $e := $m.engine | default dict }}
{{- $kind := $e.kind | default "" }}
{{- if not (has $kind ($row.engines | default list)) }}
{{- fail (printf "model %s: engine.kind must be one of %s for modality %s (got %q)" $m.id (join ", " $row.engines) $modality $kind) }}
{{- end }}
{{- $settings := $e.settings | default dict }}
{{- if and (dig "vllm" "enabled" false $e) (ne $kind "openai") }}
{{- fail (printf "model %s: engine.vllm.enabled needs engine.kind openai" $m.id) }}
{{- end }}
{{- if and (dig "triton" "enabled" false $e) (ne $kind "triton") }}
{{- fail (printf "model %s: engine.triton.enabled needs engine.kind triton" $m.id) }}
{{- end }}
{{- $pool := $m.pool | default dict }}
{{- $pooled := or $pool.selector $pool.inferencePool }}
{{- if and $pooled (not (has $kind (list "openai" "triton"))) }}
{{- fail (printf "model %s: pool.selector and pool.inferencePool need engine.kind openai or triton (remote engines)" $m.id) }}
{{- end }}
{{- if and $pooled (or (dig "vllm" "enabled" false $e) (dig "triton" "enabled" false $e)) }}
{{- fail (printf "model %s: the chart runs this model's engine; its replicas are pool.replicas, not pool.selector or pool.inferencePool" $m.id) }}
{{- end }}
{{- if and (hasKey $pool "replicas") (not (or (dig "vllm" "enabled" false $e) (dig "triton" "enabled" false $e))) }}
{{- fail (printf "model %s: pool.replicas scales a chart-managed engine (engine.vllm.enabled or engine.triton.enabled)" $m.id) }}
{{- end }}
{{- if and (eq $kind "openai") (not (include "modelplex.hasVllm" .)) (not $settings.upstream_url) (not $pooled) }}
{{- fail (printf "model %s: engine.kind openai needs engine.vllm.enabled, engine.settings.upstream_url or a pool" $m.id) }}
{{- end }}
{{- if and (include "modelplex.hasVllm" .) (not (dig "vllm" "hfModel" "" $e)) }}
{{- fail (printf "model %s: engine.vllm.hfModel is required" $m.id) }}
{{- end }}
{{- if and (eq $kind "triton") (not (include "modelplex.hasTriton" .)) (not $settings.upstream_url) (not $pooled) }}
{{- fail (printf "model %s: engine.kind triton needs engine.triton.enabled, engine.settings.upstream_url or a pool" $m.id) }}
{{- end }}
{{- $dv := $row.dataVolume | default dict }}
{{- $replicas := hasKey $m "replicaCount" | ternary $m.replicaCount $row.replicaCount | int }}
{{- if and $dv.enabled (dig "persistence" "enabled" false $dv) (gt $replicas 1) (has "ReadWriteOnce" (dig "persistence" "accessModes" list $dv)) }}
{{- fail (printf "model %s: %d replicas cannot share one ReadWriteOnce data volume; use ReadWriteMany or one replica" $m.id $replicas) }}
{{- end }}
{{- if and (dig "vllm" "lora" "enabled" false $e) (ne $modality "text") }}
{{- fail (printf "model %s: engine.vllm.lora is for text models (got %s)" $m.id $modality) }}
{{- end }}
{{- end }}
{{- include "modelplex.validateScaleToZero" . }}
{{- end }}
{{- end }}

{{/* Fails the render on a scale-to-zero setting nothing would honour. Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.validateScaleToZero" -}}
{{- $m := .model }}
{{- if $m.scaleToZero }}
{{- if not .root.Values.autoscaling.keda.enabled }}
{{- fail (printf "model %s: scaleToZero needs autoscaling.keda.enabled: KEDA, asking the catalog's scaler, is what starts its engine again; without it nothing would ever scale the model up from zero replicas" $m.id) }}
{{- end }}
{{- if not (include "modelplex.poolSettings" . | fromYaml).upstream_discovery }}
{{- fail (printf "model %s: scaleToZero needs engine replicas its backend discovers and can wait for: a chart-run engine (engine.vllm.enabled or engine.triton.enabled) or, for engines you run and scale, pool.selector or pool.inferencePool (engine.kind openai or triton)" $m.id) }}
{{- end }}
{{- /* The edge's deadline for one backend call counts the hold: past it the client gets a timeout, not the
backend's 503 + Retry-After. */}}
{{- $deadline := 600.0 }}
{{- range .root.Values.edge.extraEnv }}{{ if eq .name "MODELPLEX_EDGE_BACKEND_TIMEOUT_SECONDS" }}{{ $deadline = float64 .value }}{{ end }}{{ end }}
{{- if ge (float64 (include "modelplex.coldStartTimeout" $m)) $deadline }}
{{- fail (printf "model %s: coldStartTimeout (%s s) must be below the edge's deadline for one backend call (%v s, MODELPLEX_EDGE_BACKEND_TIMEOUT_SECONDS), which counts the wait for a replica to start" $m.id (include "modelplex.coldStartTimeout" $m) $deadline) }}
{{- end }}
{{- else if hasKey $m "coldStartTimeout" }}
{{- fail (printf "model %s: coldStartTimeout bounds how long a request waits for a replica to start from zero; it needs scaleToZero: true" $m.id) }}
{{- end }}
{{- end }}

{{/* Seconds a request for a scale-to-zero model waits for a replica to start (coldStartTimeout, 300 by default). */}}
{{- define "modelplex.coldStartTimeout" -}}
{{- .coldStartTimeout | default 300 }}
{{- end }}

{{/* The model's catalog entry as YAML. Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.catalogEntry" -}}
{{- $m := .model }}
{{- $e := $m.engine | default dict }}
{{- $entry := dict "id" $m.id }}
{{- if $m.adapter }}
{{- /* The catalog fills modality, backend, engine, capabilities and context_length from the base. */}}
{{- $adapter := dict "base" $m.adapter.base "source" $m.adapter.source }}
{{- with $m.adapter.rank }}{{ $_ := set $adapter "rank" (int64 .) }}{{ end }}
{{- $_ := set $entry "adapter" $adapter }}
{{- else }}
{{- $_ := set $entry "modality" (include "modelplex.modality" $m) }}
{{- $_ := set $entry "backend" (include "modelplex.modelBackend" .) }}
{{- end }}
{{- with $m.aliases }}{{ $_ := set $entry "aliases" . }}{{ end }}
{{- with $e.kind }}{{ $_ := set $entry "engine" (dict "kind" . "settings" (include "modelplex.engineSettings" $ | fromYaml)) }}{{ end }}
{{- with $m.capabilities }}{{ $_ := set $entry "capabilities" . }}{{ end }}
{{- with $m.contextLength }}{{ $_ := set $entry "context_length" (int64 .) }}{{ end }}
{{- with $m.defaultMaxTokens }}{{ $_ := set $entry "default_max_tokens" (int64 .) }}{{ end }}
{{- $_ := set $entry "owned_by" ($m.ownedBy | default "modelplex") }}
{{- with $m.created }}{{ $_ := set $entry "created" (int64 .) }}{{ end }}
{{- with $m.description }}{{ $_ := set $entry "description" . }}{{ end }}
{{- if $m.scaleToZero }}
{{- /* Its engines may be at zero replicas: requests wait up to cold_start_timeout seconds for one to start. */}}
{{- $_ := set $entry "scale_to_zero" true }}
{{- $_ := set $entry "cold_start_timeout" ($m.coldStartTimeout | default 300) }}
{{- end }}
{{- toYaml $entry }}
{{- end }}

{{/* The catalog file (ConfigMap content). */}}
{{- define "modelplex.catalogYaml" -}}
{{- $entries := list }}
{{- $seen := dict }}
{{- range $m := .Values.models }}
{{- $ctx := dict "root" $ "model" $m }}
{{- if include "modelplex.modelEnabled" $m }}
{{- include "modelplex.validateModel" $ctx }}
{{- $entries = append $entries (include "modelplex.catalogEntry" $ctx | fromYaml) }}
{{- end }}
{{- if include "modelplex.hasBackend" $ctx }}
{{- $name := include "modelplex.backendName" $ctx }}
{{- if hasKey $seen $name }}
{{- fail (printf "models %s and %s map to the same object name %q; rename one" (get $seen $name) $m.id $name) }}
{{- end }}
{{- $_ := set $seen $name $m.id }}
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

{{/*
Drain of a chart-run engine replica (vLLM, Triton) on scale-down and rollouts. On deletion its endpoint turns
terminating at once, so the backends' pools stop picking it within a second; the preStop `sleep` keeps it
serving meanwhile (engines.drainSeconds). Then SIGTERM: the engine refuses new requests and finishes those in
flight for up to engines.shutdownTimeoutSeconds (vLLM --shutdown-timeout, Triton --exit-timeout-secs; 600 s, the
edge's deadline for one backend call: the longest request). terminationGracePeriodSeconds covers both.
*/}}
{{- define "modelplex.engineGrace" -}}
{{- $e := .Values.engines }}
{{- if lt (int $e.terminationGracePeriodSeconds) (add (int $e.drainSeconds) (int $e.shutdownTimeoutSeconds)) }}
{{- fail (printf "engines.terminationGracePeriodSeconds (%d) must cover engines.drainSeconds (%d) + engines.shutdownTimeoutSeconds (%d): the kubelet would kill requests still in flight" (int $e.terminationGracePeriodSeconds) (int $e.drainSeconds) (int $e.shutdownTimeoutSeconds)) }}
{{- end }}
{{- int $e.terminationGracePeriodSeconds }}
{{- end }}
{{- define "modelplex.enginePreStop" -}}
{{- if .Values.engines.drainSeconds }}
lifecycle:
  # Keeps serving while its endpoint turns terminating and the backends' pools stop picking it.
  preStop:
    exec:
      command: ["sleep", {{ int .Values.engines.drainSeconds | toString | quote }}]
{{- end }}
{{- end }}

{{/* ===================== engine pools ===================== */}}

{{/* The headless Service a model's `pool.selector` gets (its EndpointSlices list the pods). */}}
{{- define "modelplex.poolServiceName" -}}
{{- include "modelplex.componentName" (list .root (printf "pool-%s" (include "modelplex.modelSlug" .model.id))) }}
{{- end }}

{{/* The ServiceAccount (and Role) of backends that discover their engine's replicas. */}}
{{- define "modelplex.poolDiscoveryName" -}}
{{- include "modelplex.componentName" (list . "pool-discovery") }}
{{- end }}

{{/* Replicas of a chart-managed engine: pool.replicas, else engine.<vllm|triton>.replicaCount, else 1.
Call with (dict "model" $m "engine" "vllm"). */}}
{{- define "modelplex.engineReplicas" -}}
{{- $pool := .model.pool | default dict }}
{{- if hasKey $pool "replicas" }}{{ $pool.replicas }}{{ else }}{{ dig .engine "replicaCount" 1 (.model.engine | default dict) | default 1 }}{{ end }}
{{- end }}

{{/*
How a model's backend finds its engine's replicas, as engine settings (so <envPrefix>UPSTREAM_*, and
the catalog entry says the same): a chart-managed vLLM/Triton engine's headless Service, a
`pool.selector`'s headless Service (EndpointSlices), or a `pool.inferencePool`. Empty: the one
upstream_url (static). Call with (dict "root" $ "model" $m).
*/}}
{{- define "modelplex.poolSettings" -}}
{{- $pool := .model.pool | default dict }}
{{- $s := dict }}
{{- if include "modelplex.hasVllm" . }}
{{- $s = dict "upstream_discovery" "endpointslices" "upstream_service" (include "modelplex.vllmName" .) "upstream_port" "http" }}
{{- if include "modelplex.vllmKvEvents" . }}
{{- $_ := set $s "pool_kv_events_port" (toString .root.Values.engines.vllm.kvEvents.port) }}
{{- end }}
{{- with include "modelplex.vllmLora" . | fromYaml }}
{{- /* Adapters the backend keeps loaded per replica: vLLM's slots. */}}
{{- $_ := set $s "pool_adapter_slots" (toString (int .maxLoras)) }}
{{- if .zeroAdapter }}
{{- /* Base-model requests under the init container's adapter of zeros (vllm-project/vllm#48421). */}}
{{- $_ := set $s "zero_adapter" "/zero-lora" }}
{{- end }}
{{- end }}
{{- else if include "modelplex.hasTriton" . }}
{{- /* The picker reads each Triton replica's queue (nv_inference_pending_request_count) from its metrics port. */}}
{{- $s = dict "upstream_discovery" "endpointslices" "upstream_service" (include "modelplex.tritonName" .) "upstream_port" "grpc" "pool_metrics_port" (toString .root.Values.engines.triton.metricsPort) }}
{{- else if and (include "modelplex.hasBackend" .) $pool.inferencePool }}
{{- $s = dict "upstream_discovery" "inferencepool" "upstream_inference_pool" $pool.inferencePool }}
{{- with $pool.port }}{{ $_ := set $s "upstream_port" (toString .) }}{{ end }}
{{- else if and (include "modelplex.hasBackend" .) $pool.selector }}
{{- $s = dict "upstream_discovery" "endpointslices" "upstream_service" (include "modelplex.poolServiceName" .) "upstream_port" "engine" }}
{{- end }}
{{- toYaml $s }}
{{- end }}

{{/* "true" when some model's backend discovers replicas (the chart then renders the discovery RBAC);
"inferencepool" when one of them uses an InferencePool. */}}
{{- define "modelplex.poolDiscoveryKinds" -}}
{{- $kinds := dict }}
{{- range $m := .Values.models }}
{{- with (include "modelplex.poolSettings" (dict "root" $ "model" $m) | fromYaml).upstream_discovery }}
{{- $_ := set $kinds . true }}
{{- end }}
{{- end }}
{{- keys $kinds | sortAlpha | join "," }}
{{- end }}
