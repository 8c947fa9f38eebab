{{/* Names and labels, after `helm create`'s conventions. */}}

{{- define "niximage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "niximage.fullname" -}}
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

{{- define "niximage.selectorLabels" -}}
app.kubernetes.io/name: {{ include "niximage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "niximage.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "niximage.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "niximage.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "niximage.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The builder pods' service account; empty: the namespace's default. */}}
{{- define "niximage.builderServiceAccountName" -}}
{{- if .Values.builder.serviceAccount.create }}
{{- default (printf "%s-builder" (include "niximage.fullname" .) | trunc 63 | trimSuffix "-") .Values.builder.serviceAccount.name }}
{{- else }}
{{- .Values.builder.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Namespaces that get the builder service account, each once, release namespace first. */}}
{{- define "niximage.builderNamespaces" -}}
{{- $all := list .Release.Namespace }}
{{- range concat .Values.operator.watchNamespaces .Values.builder.serviceAccount.namespaces }}
{{- if not (has . $all) }}{{ $all = append $all . }}{{ end }}
{{- end }}
{{- join "," $all }}
{{- end }}

{{/* The image, by digest when one is given: the operator hands the same to builder pods. */}}
{{- define "niximage.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The storage URL every component is given. */}}
{{- define "niximage.storageUrl" -}}
{{- if eq .Values.storage.type "gcs" }}
{{- $prefix := trimAll "/" .Values.storage.gcs.prefix }}
{{- printf "gs://%s%s" .Values.storage.gcs.bucket (ternary (printf "/%s" $prefix) "" (ne $prefix "")) }}
{{- else }}
{{- .Values.storage.filesystem.path }}
{{- end }}
{{- end }}

{{- define "niximage.storageClaim" -}}
{{- default (printf "%s-storage" (include "niximage.fullname" .)) .Values.storage.filesystem.existingClaim }}
{{- end }}

{{/* host[:port] in image references: the value, else the Service's cluster DNS name. */}}
{{- define "niximage.registryHost" -}}
{{- if .Values.registry.host }}
{{- .Values.registry.host }}
{{- else }}
{{- printf "%s.%s.svc.cluster.local:%v" (include "niximage.fullname" .) .Release.Namespace .Values.registry.service.port }}
{{- end }}
{{- end }}

{{/* The Workload Identity annotation, for service accounts that reach GCS. */}}
{{- define "niximage.workloadIdentity" -}}
{{- if and (eq .Values.storage.type "gcs") .Values.storage.gcs.workloadIdentity.serviceAccount }}
iam.gke.io/gcp-service-account: {{ .Values.storage.gcs.workloadIdentity.serviceAccount | quote }}
{{- end }}
{{- end }}

{{/* Both containers: nothing beyond what a Python program serving HTTP needs. */}}
{{- define "niximage.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end }}

{{/* The names of an imagePullSecrets list ([{name: …}]), comma-joined. */}}
{{- define "niximage.secretNames" -}}
{{- $names := list }}
{{- range . }}{{ $names = append $names .name }}{{ end }}
{{- join "," $names }}
{{- end }}
