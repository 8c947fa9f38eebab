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

{{/* Each Deployment selects its own pods: the operator's and the registry's share the
     name and instance labels, and differ in the component. */}}
{{- define "niximage.operatorSelectorLabels" -}}
{{ include "niximage.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "niximage.registrySelectorLabels" -}}
{{ include "niximage.selectorLabels" . }}
app.kubernetes.io/component: registry
{{- end }}

{{- define "niximage.registryName" -}}
{{- printf "%s-registry" (include "niximage.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "niximage.registryServiceAccountName" -}}
{{- if .Values.registry.serviceAccount.create }}
{{- default (include "niximage.registryName" .) .Values.registry.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.registry.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The ClusterRole (get NixImages) that each namespace's puller account is bound to. */}}
{{- define "niximage.pullerClusterRole" -}}
{{- printf "%s-puller" (include "niximage.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Service account tokens as pull passwords (TokenReview, SubjectAccessReview). */}}
{{- define "niximage.kubernetesPullAuth" -}}
{{- if and .Values.registry.auth.enabled .Values.registry.auth.kubernetes }}true{{ end }}
{{- end }}

{{/* The Secret and key of the HMAC key the registry replicas sign tokens with. */}}
{{- define "niximage.tokenKeySecretName" -}}
{{- default (printf "%s-token-key" (include "niximage.registryName" .)) .Values.registry.auth.tokenKeySecret.name }}
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

{{/* The registry's: its own read-only Google service account, else the one above. */}}
{{- define "niximage.registryWorkloadIdentity" -}}
{{- $identity := .Values.storage.gcs.workloadIdentity }}
{{- $account := $identity.registryServiceAccount | default $identity.serviceAccount }}
{{- if and (eq .Values.storage.type "gcs") $account }}
iam.gke.io/gcp-service-account: {{ $account | quote }}
{{- end }}
{{- end }}

{{/* The registry's GCS key Secret (name and key): its own read-only one, else the
     operator's; empty name: none. */}}
{{- define "niximage.registryGcsKey" -}}
{{- $gcs := .Values.storage.gcs }}
{{- if eq .Values.storage.type "gcs" }}
{{- if $gcs.registryKeySecret.name }}
{{- toJson $gcs.registryKeySecret }}
{{- else if $gcs.keySecret.name }}
{{- toJson $gcs.keySecret }}
{{- end }}
{{- end }}
{{- end }}

{{/* Every container: nothing beyond what a Python program serving HTTP needs. */}}
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

{{/* What the kubelet would mount into every container by itself, for the one container
     that talks to the API: a bound token (3607 s: the API server extends it for clients
     that do not reload it), the cluster's CA and the namespace. */}}
{{- define "niximage.kubeApiAccessVolume" -}}
- name: kube-api-access
  projected:
    defaultMode: 0444
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3607
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                apiVersion: v1
                fieldPath: metadata.namespace
{{- end }}
