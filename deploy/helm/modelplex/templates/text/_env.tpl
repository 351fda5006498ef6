{{/* Environment of a text backend container. Call with (dict "root" $ "model" $m). */}}
{{- define "modelplex.textEnv" -}}
{{- $root := .root }}
{{- $m := .model }}
{{- $e := $m.engine -}}
- name: MODELPLEX_TEXT_LISTEN
  value: {{ printf "0.0.0.0:%v" $root.Values.text.port | quote }}
- name: MODELPLEX_METRICS_PORT
  value: {{ $root.Values.text.metricsPort | quote }}
- name: MODELPLEX_TEXT_ENGINE
  value: {{ $e.kind | quote }}
{{- if eq $e.kind "llamacpp" }}
- name: MODELPLEX_TEXT_MODEL_PATH
  value: {{ $e.modelPath | default "" | quote }}
- name: MODELPLEX_TEXT_THREADS
  value: {{ $e.threads | default $root.Values.text.threads | quote }}
{{- else }}
- name: MODELPLEX_TEXT_UPSTREAM_URL
  value: {{ include "modelplex.upstreamUrl" . | quote }}
- name: MODELPLEX_TEXT_UPSTREAM_MODEL
  value: {{ include "modelplex.upstreamModel" . | quote }}
{{- end }}
{{- if and (eq $e.kind "openai") $e.apiKeySecret }}
- name: MODELPLEX_TEXT_UPSTREAM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $e.apiKeySecret.name }}
      key: {{ $e.apiKeySecret.key | default "api-key" }}
{{- end }}
{{- if eq $e.kind "triton" }}
- name: MODELPLEX_TEXT_TRITON_FLAVOR
  value: {{ $e.flavor | default "vllm" | quote }}
- name: MODELPLEX_TEXT_TOKENIZER_PATH
  value: {{ $e.tokenizerPath | default "" | quote }}
{{- end }}
{{- with $root.Values.text.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- with $m.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
