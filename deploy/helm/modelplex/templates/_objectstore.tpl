{{/*
The object store's settings for a service reading them under env prefix <P> (videos backends:
MODELPLEX_VIDEOS_, the edge: MODELPLEX_EDGE_), from .Values.objectStore. `local` sets nothing (each
service's default directory); `s3` names the bucket and endpoint, and takes the credentials from
objectStore.secretName (none: the pod's own, e.g. a workload identity). Call with (list $ "<P>").
*/}}
{{- define "modelplex.objectStoreEnv" -}}
{{- $s := (index . 0).Values.objectStore | default dict }}
{{- $p := index . 1 }}
{{- if eq ($s.kind | default "local") "s3" }}
{{- if not $s.bucket }}{{ fail "objectStore.kind s3 needs objectStore.bucket" }}{{ end }}
- name: {{ $p }}OBJECT_STORE
  value: s3
- name: {{ $p }}OBJECT_STORE_BUCKET
  value: {{ $s.bucket | quote }}
{{- with $s.prefix }}
- name: {{ $p }}OBJECT_STORE_PREFIX
  value: {{ . | quote }}
{{- end }}
{{- with $s.endpoint }}
- name: {{ $p }}OBJECT_STORE_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with $s.region }}
- name: {{ $p }}OBJECT_STORE_REGION
  value: {{ . | quote }}
{{- end }}
- name: {{ $p }}OBJECT_STORE_ADDRESSING_STYLE
  value: {{ $s.addressingStyle | default "path" | quote }}
{{- with $s.secretName }}
- name: {{ $p }}OBJECT_STORE_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $s.accessKeyIdKey | default "access-key-id" }}
- name: {{ $p }}OBJECT_STORE_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $s.secretAccessKeyKey | default "secret-access-key" }}
{{- end }}
{{- end }}
{{- end }}
