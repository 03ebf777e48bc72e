{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "keygate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every resource. Truncated to 52 characters so that the longest suffix
("-webhook-cert", "-inject") still fits a 63-character DNS label.
*/}}
{{- define "keygate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "keygate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "keygate.labels" -}}
helm.sh/chart: {{ include "keygate.chart" . }}
{{ include "keygate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: keygate
{{- end }}

{{/* Labels that select the operator Pods. Never change them: Deployment selectors are immutable. */}}
{{- define "keygate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keygate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "keygate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "keygate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "keygate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "keygate.sidecarImage" -}}
{{- $repo := default .Values.image.repository .Values.sidecar.image.repository }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.sidecar.image.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}

{{/* The token server Service and the issuer derived from it. */}}
{{- define "keygate.tokenServiceName" -}}
{{- include "keygate.fullname" . }}
{{- end }}

{{- define "keygate.issuerUrl" -}}
{{- if .Values.issuerUrl }}
{{- .Values.issuerUrl }}
{{- else if eq (int .Values.tokenService.port) 80 }}
{{- printf "http://%s.%s.svc" (include "keygate.tokenServiceName" .) .Release.Namespace }}
{{- else }}
{{- printf "http://%s.%s.svc:%d" (include "keygate.tokenServiceName" .) .Release.Namespace (int .Values.tokenService.port) }}
{{- end }}
{{- end }}

{{- define "keygate.webhookServiceName" -}}
{{- printf "%s-webhook" (include "keygate.fullname" .) }}
{{- end }}

{{- define "keygate.mutatingWebhookName" -}}
{{- printf "%s-inject" (include "keygate.fullname" .) }}
{{- end }}

{{- define "keygate.validatingWebhookName" -}}
{{- printf "%s-validate" (include "keygate.fullname" .) }}
{{- end }}

{{/* cert-manager objects (certManager.enabled). */}}
{{- define "keygate.certificateName" -}}
{{- printf "%s-webhook" (include "keygate.fullname" .) }}
{{- end }}

{{- define "keygate.certificateSecretName" -}}
{{- printf "%s-webhook-cert" (include "keygate.fullname" .) }}
{{- end }}

{{- define "keygate.issuerName" -}}
{{- printf "%s-selfsigned" (include "keygate.fullname" .) }}
{{- end }}

{{/* "cert-manager" or "self": who provides the webhook's serving certificate. */}}
{{- define "keygate.webhookTls" -}}
{{- if .Values.certManager.enabled }}cert-manager{{ else }}self{{ end }}
{{- end }}

{{/* Fixed names of the objects the operator keeps in its own namespace. */}}
{{- define "keygate.ownSecrets" -}}
- keygate-signing-keys
{{- if eq (include "keygate.webhookTls" .) "self" }}
- keygate-webhook-tls
{{- end }}
{{- end }}

{{- define "keygate.ownConfigMaps" -}}
- keygate-revocations
{{- end }}

{{/*
Rules for managing keygate resources in a namespace: in the ClusterRole when watchNamespaces
is empty, in a Role per watched namespace otherwise.
*/}}
{{- define "keygate.namespacedRules" }}
# keygate's own resources: read them, write their status.
- apiGroups: ["keygate.dev"]
  resources: ["m2mroles", "apiclients", "scopepolicies"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["keygate.dev"]
  resources: ["m2mroles/status", "apiclients/status", "scopepolicies/status"]
  verbs: ["get", "patch", "update"]
# The credentials Secrets and policy ConfigMaps carry a controller ownerReference with
# blockOwnerDeletion, which clusters with the OwnerReferencesPermissionEnforcement admission
# plugin only allow to whoever may update the owner's finalizers.
- apiGroups: ["keygate.dev"]
  resources: ["apiclients/finalizers", "scopepolicies/finalizers"]
  verbs: ["update"]
# A Secret per ApiClient, a ConfigMap per ScopePolicy.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
