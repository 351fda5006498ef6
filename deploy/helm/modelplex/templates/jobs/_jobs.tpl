{{/* ===================== the jobs process and the stores it shares with the edge ===================== */}}

{{/* "true" when gatekeeper.redis names a Redis (a URL or a Secret holding one). */}}
{{- define "modelplex.redisConfigured" -}}
{{- $redis := .Values.gatekeeper.redis -}}
{{- if or $redis.existingSecret $redis.url }}true{{ end }}
{{- end }}

{{/* An env var holding the shared Redis URL, from its Secret or as given. Call with (list $ "NAME"). */}}
{{- define "modelplex.redisUrlEnv" -}}
{{- $redis := (index . 0).Values.gatekeeper.redis -}}
- name: {{ index . 1 }}
{{- if $redis.existingSecret }}
  valueFrom:
    secretKeyRef:
      name: {{ $redis.existingSecret }}
      key: {{ $redis.secretKey }}
{{- else }}
  value: {{ $redis.url | quote }}
{{- end }}
{{- end }}

{{/*
Where the jobs process runs (empty: jobs.enabled is false).
  deployment  its own Deployment <release>-jobs, scaled by KEDA on its queue (to zero): every store it reads is
              shared by every pod: the queues and stored responses in Redis (gatekeeper.redis), files and batch
              results in the S3 object store (objectStore.kind s3).
  pod         a container beside each edge: without those, the edge's stores are its pod's own (SQLite files
              and the local object store on the pod's `jobs-state` volume), which only a process in that pod
              can share.
*/}}
{{- define "modelplex.jobsMode" -}}
{{- if .Values.jobs.enabled }}
{{- if and (include "modelplex.redisConfigured" .) (eq (.Values.objectStore.kind | default "local") "s3") }}deployment{{ else }}pod{{ end }}
{{- end }}
{{- end }}

{{/* Where the pod-mode stores live (the edge pod's jobs-state volume). */}}
{{- define "modelplex.podStateDir" -}}/var/lib/modelplex-state{{- end }}

{{/* The local object store's directory for the edge and the jobs process. */}}
{{- define "modelplex.edgeObjectDir" -}}
{{- if eq (include "modelplex.jobsMode" .) "pod" }}{{ include "modelplex.podStateDir" . }}/objects{{ else }}/tmp/modelplex-objects{{ end }}
{{- end }}

{{/*
The edge's stores, the same for the edge and the jobs process (settings MODELPLEX_EDGE_*):
  stored responses (and the background responses' queue beside them): Redis when gatekeeper.redis is set (any
    edge continues any conversation, any jobs process runs a background response); else, with the jobs process
    in the edge pod, SQLite on that pod's jobs-state volume; else each edge's memory.
  the batch queue: Redis when Redis and the S3 object store are both set (a batch's files are where every pod
    reads them); else, with the jobs process in the edge pod, SQLite on the pod's volume; else in memory.
*/}}
{{- define "modelplex.storesEnv" -}}
{{- $mode := include "modelplex.jobsMode" . -}}
{{- $redis := include "modelplex.redisConfigured" . -}}
{{- $state := include "modelplex.podStateDir" . -}}
{{- if $redis }}
- name: MODELPLEX_EDGE_RESPONSES_STORE
  value: redis
{{ include "modelplex.redisUrlEnv" (list . "MODELPLEX_EDGE_RESPONSES_REDIS_URL") }}
{{- else if eq $mode "pod" }}
- name: MODELPLEX_EDGE_RESPONSES_STORE
  value: sqlite
- name: MODELPLEX_EDGE_RESPONSES_SQLITE_PATH
  value: {{ printf "%s/responses.sqlite3" $state | quote }}
{{- end }}
{{- if and $redis (eq (.Values.objectStore.kind | default "local") "s3") }}
- name: MODELPLEX_EDGE_BATCHES_STORE
  value: redis
{{ include "modelplex.redisUrlEnv" (list . "MODELPLEX_EDGE_BATCHES_REDIS_URL") }}
{{- else if eq $mode "pod" }}
- name: MODELPLEX_EDGE_BATCHES_STORE
  value: sqlite
- name: MODELPLEX_EDGE_BATCHES_SQLITE_PATH
  value: {{ printf "%s/batches.sqlite3" $state | quote }}
{{- end }}
- name: MODELPLEX_EDGE_OBJECT_DIR
  value: {{ include "modelplex.edgeObjectDir" . | quote }}
{{- include "modelplex.objectStoreEnv" (list . "MODELPLEX_EDGE_") }}
{{- end }}

{{/* The catalog's gRPC target inside the cluster (host:port): the edge's catalog, the scaler's demand reports. */}}
{{- define "modelplex.catalogTarget" -}}
{{- printf "%s:%v" (include "modelplex.serviceHost" (list . (include "modelplex.componentName" (list . "catalog")))) .Values.catalog.port }}
{{- end }}

{{/* The address KEDA's operator calls the catalog's external scaler at (a ScaledObject's scalerAddress). */}}
{{- define "modelplex.scalerAddress" -}}
{{- printf "%s.%s.svc:%v" (include "modelplex.componentName" (list . "catalog")) .Release.Namespace .Values.catalog.port }}
{{- end }}

{{/* The jobs container (`python -m modelplex_edge.jobs`, the edge image): in its own Deployment or in the edge pod.
Its port (jobs.port) serves /healthz, /readyz and /metrics. */}}
{{- define "modelplex.jobsContainer" -}}
{{- $jobs := .Values.jobs -}}
{{- $mode := include "modelplex.jobsMode" . -}}
- name: jobs
  image: {{ include "modelplex.image" (list . .Values.edge.image) | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["python", "-m", "modelplex_edge.jobs"]
  ports:
    - name: jobs-http
      containerPort: {{ $jobs.port }}
      protocol: TCP
  # The edge's settings (MODELPLEX_EDGE_*: stores, catalog, gatekeeper, worker counts) and its own (MODELPLEX_JOBS_*).
  env:
    - name: MODELPLEX_JOBS_HOST
      value: "0.0.0.0"
    - name: MODELPLEX_JOBS_PORT
      value: {{ $jobs.port | quote }}
    - name: MODELPLEX_EDGE_CATALOG_TARGET
      value: {{ include "modelplex.catalogTarget" . | quote }}
    - name: MODELPLEX_GRACE_SECONDS
      value: {{ $jobs.shutdown.graceSeconds | quote }}
    {{- if not .Values.gatekeeper.enabled }}
    # Without the gatekeeper the dev key is the one key, as on the edge.
    - name: MODELPLEX_DEV_API_KEY
      valueFrom:
        secretKeyRef:
          name: {{ .Values.edge.devApiKey.existingSecret | default (include "modelplex.componentName" (list . "dev-api-key")) }}
          key: {{ .Values.edge.devApiKey.secretKey }}
    {{- end }}
    {{- include "modelplex.storesEnv" . | trim | nindent 4 }}
    {{- include "modelplex.gatekeeperClientEnv" . | trim | nindent 4 }}
    {{- if and (eq $mode "deployment") .Values.autoscaling.keda.enabled }}
    # Queued and running jobs, reported under the key `jobs` to the scaler KEDA asks.
    - name: MODELPLEX_JOBS_DEMAND_TARGET
      value: {{ include "modelplex.catalogTarget" . | quote }}
    {{- end }}
    {{- with $jobs.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  startupProbe:
    httpGet:
      path: /healthz
      port: jobs-http
    periodSeconds: 2
    failureThreshold: 30
  livenessProbe:
    httpGet:
      path: /healthz
      port: jobs-http
    periodSeconds: 10
    timeoutSeconds: 3
    failureThreshold: 3
  readinessProbe:
    httpGet:
      path: /readyz
      port: jobs-http
    periodSeconds: 5
    timeoutSeconds: 3
    failureThreshold: 3
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $jobs.resources | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- if eq $mode "pod" }}
    - name: jobs-state
      mountPath: {{ include "modelplex.podStateDir" . }}
    {{- end }}
    {{- include "modelplex.gatekeeperClientMounts" . | trim | nindent 4 }}
{{- end }}
