{{/* ===================== gatekeeper (in the edge pod, and the jobs pod) ===================== */}}

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

{{/* Mounts of whichever process decides. */}}
{{- define "modelplex.gatekeeperMounts" -}}
# A directory mount: a subPath mount would never see the Secret's updates (hot reload).
- name: gatekeeper-keys
  mountPath: /etc/modelplex/keys
  readOnly: true
- name: gatekeeper-usage
  mountPath: /var/lib/modelplex
{{- end }}

{{/* Environment of a process that asks the gatekeeper (the edge, the jobs process): the sidecar's socket, or
the gatekeeper inside the process (embedded). Nothing with the gatekeeper disabled. */}}
{{- define "modelplex.gatekeeperClientEnv" -}}
{{- $gk := .Values.gatekeeper -}}
{{- if and $gk.enabled (eq $gk.mode "sidecar") }}
- name: MODELPLEX_EDGE_GATEKEEPER_TARGET
  value: unix:///run/modelplex/gatekeeper.sock
- name: MODELPLEX_EDGE_GATEKEEPER_LEASES
  value: {{ $gk.leases.enabled | quote }}
- name: MODELPLEX_EDGE_GATEKEEPER_FAILURE
  value: {{ $gk.leases.sidecarFailure | quote }}
{{- else if and $gk.enabled (eq $gk.mode "embedded") }}
- name: MODELPLEX_EDGE_GATEKEEPER_TARGET
  value: embedded
{{ include "modelplex.gatekeeperEnv" . }}
{{- end }}
{{- end }}

{{/* Mounts of a process that asks the gatekeeper: the sidecar's socket, or (embedded) the keys and usage. */}}
{{- define "modelplex.gatekeeperClientMounts" -}}
{{- $gk := .Values.gatekeeper -}}
{{- if and $gk.enabled (eq $gk.mode "sidecar") }}
- name: gatekeeper-socket
  mountPath: /run/modelplex
{{- else if and $gk.enabled (eq $gk.mode "embedded") }}
{{ include "modelplex.gatekeeperMounts" . }}
{{- end }}
{{- end }}

{{/* The gatekeeper sidecar container (gatekeeper.mode sidecar), the same in every pod that has one (the edge's,
the jobs process's): it listens on a unix socket in the pod's gatekeeper-socket volume. */}}
{{- define "modelplex.gatekeeperSidecar" -}}
{{- $gk := .Values.gatekeeper -}}
- name: gatekeeper
  image: {{ include "modelplex.image" (list . (ternary .Values.edge.image $gk.image (empty $gk.image.repository))) | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["python", "-m", "modelplex_gatekeeper"]
  env:
    - name: MODELPLEX_GATEKEEPER_LISTEN
      value: unix:///run/modelplex/gatekeeper.sock
    - name: MODELPLEX_GATEKEEPER_LEASE_SECONDS
      value: {{ $gk.leases.seconds | quote }}
    - name: MODELPLEX_METRICS_PORT
      value: {{ $gk.metricsPort | quote }}
    {{- include "modelplex.gatekeeperEnv" . | nindent 4 }}
  ports:
    - name: gk-metrics
      containerPort: {{ $gk.metricsPort }}
      protocol: TCP
  # The socket is not reachable by the kubelet's gRPC probe: ask grpc.health.v1 from inside.
  {{- $probe := list "python" "-c" "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; ch = grpc.insecure_channel('unix:///run/modelplex/gatekeeper.sock'); r = g.HealthStub(ch).Check(h.HealthCheckRequest(), timeout=3); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)" }}
  startupProbe:
    exec:
      command: {{ toJson $probe }}
    periodSeconds: 2
    failureThreshold: 30
  # Not serving: the process beside it could authorize nothing, so the pod is not Ready.
  readinessProbe:
    exec:
      command: {{ toJson $probe }}
    periodSeconds: 10
    timeoutSeconds: 5
  livenessProbe:
    exec:
      command: {{ toJson $probe }}
    periodSeconds: 20
    timeoutSeconds: 5
    failureThreshold: 3
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $gk.resources | nindent 4 }}
  volumeMounts:
    - name: gatekeeper-socket
      mountPath: /run/modelplex
    {{- include "modelplex.gatekeeperMounts" . | nindent 4 }}
{{- end }}

{{/* The gatekeeper's volumes (socket, keys, usage) in a pod that asks it; nothing with it disabled. */}}
{{- define "modelplex.gatekeeperVolumes" -}}
{{- $gk := .Values.gatekeeper -}}
{{- if $gk.enabled }}
- name: gatekeeper-socket
  emptyDir:
    medium: Memory
- name: gatekeeper-keys
  secret:
    secretName: {{ include "modelplex.gatekeeperKeysSecret" . }}
    items:
      - key: {{ $gk.keys.secretKey }}
        path: {{ $gk.keys.secretKey }}
- name: gatekeeper-usage
  emptyDir: {}
{{- end }}
{{- end }}
