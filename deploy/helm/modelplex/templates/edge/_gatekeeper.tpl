{{/* ===================== gatekeeper (in the edge pod) ===================== */}}

{{/* The Secret holding the keys file. */}}
{{- define "modelplex.gatekeeperKeysSecret" -}}
{{- $gk := .Values.gatekeeper -}}
{{- if $gk.keys.existingSecret -}}
{{- $gk.keys.existingSecret -}}
{{- else if .Values.edge.devApiKey.existingSecret -}}
{{- fail "gatekeeper.keys.existingSecret is required when edge.devApiKey.existingSecret is set (the chart cannot hash a key it does not know)" -}}
{{- else -}}
{{- include "modelplex.componentName" (list . "dev-api-key") -}}
{{- end -}}
{{- end }}

{{/* Environment of whichever process decides (the sidecar, or the edge when embedded). */}}
{{- define "modelplex.gatekeeperEnv" -}}
{{- $gk := .Values.gatekeeper -}}
- name: MODELPLEX_KEYS_FILE
  value: {{ printf "/etc/modelplex/keys/%s" $gk.keys.secretKey | quote }}
- name: MODELPLEX_GATEKEEPER_USAGE_FILE
  value: /var/lib/modelplex/usage.jsonl
- name: MODELPLEX_GATEKEEPER_SLOT_TTL_SECONDS
  value: {{ $gk.slotTtlSeconds | quote }}
- name: MODELPLEX_GATEKEEPER_REDIS_FAILURE
  value: {{ $gk.redis.failure | quote }}
{{- if $gk.redis.existingSecret }}
- name: MODELPLEX_GATEKEEPER_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $gk.redis.existingSecret }}
      key: {{ $gk.redis.secretKey }}
{{- else if $gk.redis.url }}
- name: MODELPLEX_GATEKEEPER_REDIS_URL
  value: {{ $gk.redis.url | quote }}
{{- end }}
{{- end }}

{{/* The edge's stored responses (/v1/responses): in the gatekeeper's Redis when one is configured, so any
edge replica continues any conversation; otherwise in each pod's memory. */}}
{{- define "modelplex.responsesEnv" -}}
{{- $redis := .Values.gatekeeper.redis -}}
{{- if or $redis.existingSecret $redis.url }}
- name: MODELPLEX_EDGE_RESPONSES_STORE
  value: redis
{{- if $redis.existingSecret }}
- name: MODELPLEX_EDGE_RESPONSES_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $redis.existingSecret }}
      key: {{ $redis.secretKey }}
{{- else }}
- name: MODELPLEX_EDGE_RESPONSES_REDIS_URL
  value: {{ $redis.url | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Mounts of whichever process decides. */}}
{{- define "modelplex.gatekeeperMounts" -}}
# A directory mount: a subPath mount would never see the Secret's updates (hot reload).
- name: gatekeeper-keys
  mountPath: /etc/modelplex/keys
  readOnly: true
- name: gatekeeper-usage
  mountPath: /var/lib/modelplex
{{- end }}
