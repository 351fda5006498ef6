{{/*
Environment of a backend container, the same for every modality: <P>LISTEN, <P>ENGINE and
<P><KEY> for each key of the model's engine settings (the dict the catalog entry carries),
<P><KEY> from a Secret for each engine.secretSettings key (never written to the catalog),
the object store's (objectStore) for a row with objectStore: true, then the shared gRPC server settings. Call with (dict "root" $ "model" $m).
*/}}
{{- define "modelplex.backendEnv" -}}
{{- $m := .model }}
{{- $row := include "modelplex.backendRow" . | fromYaml }}
{{- $p := $row.envPrefix }}
{{- $e := $m.engine | default dict -}}
- name: {{ $p }}LISTEN
  value: {{ printf "0.0.0.0:%v" $row.port | quote }}
- name: {{ $p }}ENGINE
  value: {{ $e.kind | quote }}
{{- range $key, $value := include "modelplex.engineSettings" . | fromYaml }}
- name: {{ printf "%s%s" $p (upper $key) }}
  value: {{ include "modelplex.envValue" $value | quote }}
{{- end }}
{{- range $key, $ref := $e.secretSettings }}
- name: {{ printf "%s%s" $p (upper $key) }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
{{- end }}
{{- with $row.dataVolume }}
{{- if .enabled }}
- name: {{ printf "%s%s" $p (upper .setting) }}
  value: {{ .mountPath | quote }}
{{- end }}
{{- end }}
{{- if (include "modelplex.poolSettings" . | fromYaml).upstream_discovery }}
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end }}
{{- /* A remote engine's backend replicas share their pool's picks through the shared Redis (when set),
so every one places a prefix where the others did (modelplex_kit/pools/sync.py). */}}
{{- $redis := .root.Values.gatekeeper.redis }}
{{- if and (has ($e.kind | default "") (list "openai" "triton")) (or $redis.existingSecret $redis.url) }}
- name: {{ $p }}POOL_SYNC_URL
{{- if $redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ $redis.existingSecret }}
      key: {{ $redis.secretKey }}
{{- else }}
  value: {{ $redis.url | quote }}
{{- end }}
{{- end }}
{{- if $m.scaleToZero }}
{{- /* Its pool may have no replica ready: a request waits this long for one to start (then 503 + Retry-After). */}}
- name: {{ $p }}POOL_COLD_START_TIMEOUT_SECONDS
  value: {{ include "modelplex.envValue" ($m.coldStartTimeout | default 300) | quote }}
{{- end }}
{{- /* The demand KEDA scales the engines on (held, in flight, the engines' queues), reported to the catalog's
scaler under the model id: by every chart-run engine's backend with KEDA on, and by a scale-to-zero model's. */}}
{{- if and .root.Values.autoscaling.keda.enabled (or (include "modelplex.hasVllm" .) (include "modelplex.hasTriton" .) $m.scaleToZero) }}
- name: {{ $p }}POOL_DEMAND_TARGET
  value: {{ include "modelplex.catalogTarget" .root | quote }}
- name: {{ $p }}POOL_DEMAND_KEY
  value: {{ $m.id | quote }}
{{- end }}
{{- if $row.objectStore }}
{{ include "modelplex.objectStoreEnv" (list .root $p) }}
{{- end }}
- name: MODELPLEX_METRICS_PORT
  value: {{ $row.metricsPort | quote }}
- name: MODELPLEX_GRACE_SECONDS
  value: {{ $row.shutdown.graceSeconds | quote }}
- name: MODELPLEX_MAX_CONNECTION_AGE_SECONDS
  value: {{ $row.maxConnectionAgeSeconds | quote }}
{{- with $row.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with $m.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
