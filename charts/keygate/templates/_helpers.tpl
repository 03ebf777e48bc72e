{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "keygate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every resource. Truncated to 52 characters so that the longest suffix
("-webhook-cert", "-issuer-ca") still fits a 63-character DNS label.
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
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
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

{{/* The operator's image: repository@digest when image.digest is set, repository:tag otherwise. */}}
{{- define "keygate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The injected sidecar's image. A digest wins over a tag; without a sidecar digest or tag, the
sidecar image is the operator's own (its digest, else its tag) when the repository is too.
*/}}
{{- define "keygate.sidecarImage" -}}
{{- $repo := default .Values.image.repository .Values.sidecar.image.repository }}
{{- $digest := .Values.sidecar.image.digest }}
{{- if and (not $digest) (not .Values.sidecar.image.tag) (eq $repo .Values.image.repository) }}
{{- $digest = .Values.image.digest }}
{{- end }}
{{- if $digest }}
{{- printf "%s@%s" $repo $digest }}
{{- else }}
{{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.sidecar.image.tag }}
{{- printf "%s:%s" $repo $tag }}
{{- end }}
{{- end }}

{{/* The token server Service and the issuer derived from it. */}}
{{- define "keygate.tokenServiceName" -}}
{{- include "keygate.fullname" . }}
{{- end }}

{{/* The token Service's in-cluster URL: https on 443 (http on 80) needs no port. */}}
{{- define "keygate.tokenServiceUrl" -}}
{{- $tls := .Values.tokenService.tls.enabled }}
{{- $scheme := ternary "https" "http" $tls }}
{{- $port := int .Values.tokenService.port }}
{{- $host := printf "%s.%s.svc" (include "keygate.tokenServiceName" .) .Release.Namespace }}
{{- if eq $port (int (ternary 443 80 $tls)) }}
{{- printf "%s://%s" $scheme $host }}
{{- else }}
{{- printf "%s://%s:%d" $scheme $host $port }}
{{- end }}
{{- end }}

{{- define "keygate.issuerUrl" -}}
{{- default (include "keygate.tokenServiceUrl" .) .Values.issuerUrl }}
{{- end }}

{{/* "self", "cert-manager" or "disabled": how the token server is served. */}}
{{- define "keygate.tokenTls" -}}
{{- if not .Values.tokenService.tls.enabled }}disabled{{ else if .Values.certManager.enabled }}cert-manager{{ else }}self{{ end }}
{{- end }}

{{/* Fails the render on an http:// issuerUrl while the token server serves HTTPS. */}}
{{- define "keygate.checkIssuerUrl" -}}
{{- if and .Values.tokenService.tls.enabled (hasPrefix "http://" (lower .Values.issuerUrl)) }}
{{- fail (printf "issuerUrl: %q is http:// but the token server serves HTTPS (tokenService.tls.enabled): give an https:// URL, or set tokenService.tls.enabled=false where a mesh or an Ingress terminates TLS in front of it" .Values.issuerUrl) }}
{{- end }}
{{- end }}

{{/* The host of issuerUrl when it is not the token Service's own (empty otherwise). */}}
{{- define "keygate.issuerHost" -}}
{{- with .Values.issuerUrl }}
{{- $host := (urlParse .).hostname | lower }}
{{- if ne $host (printf "%s.%s.svc" (include "keygate.tokenServiceName" $) $.Release.Namespace) }}
{{- $host }}
{{- end }}
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

{{- define "keygate.tokenCertificateName" -}}
{{- printf "%s-token" (include "keygate.fullname" .) }}
{{- end }}

{{- define "keygate.tokenCertificateSecretName" -}}
{{- printf "%s-token-cert" (include "keygate.fullname" .) }}
{{- end }}

{{/* The self-signed Issuer that only signs the chart's CA. */}}
{{- define "keygate.issuerName" -}}
{{- printf "%s-selfsigned" (include "keygate.fullname" .) }}
{{- end }}

{{/*
The chart's CA in cert-manager mode: its Certificate, its Secret (which holds the CA key,
unlike the ConfigMap keygate-ca the operator publishes for clients) and the Issuer that signs
with it.
*/}}
{{- define "keygate.caName" -}}
{{- printf "%s-issuer-ca" (include "keygate.fullname" .) }}
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
{{- if eq (include "keygate.tokenTls" .) "self" }}
- keygate-token-tls
{{- end }}
{{- end }}

{{- define "keygate.ownConfigMaps" -}}
{{- /* keygate-revocations: the store of earlier versions, read once and deleted. */}}
- keygate-revocations
{{- range until 16 }}
- keygate-revocations-{{ . }}
{{- end }}
{{- if ne (include "keygate.tokenTls" .) "disabled" }}
- keygate-ca
{{- end }}
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
# A NetworkPolicy per ScopePolicy: capture mode network-policy.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch", "update", "delete"]
{{- end }}

{{/*
The flags the chart sets on `keygate operator` (as arguments, or through the environment
variables POD_NAMESPACE and POD_NAME), each with what to do instead. keygate exits at start
on an argument given twice, and the chart's other objects rely on these values, so
extraArgs may not give any of them, whether or not the current values render it.
tests/helm checks that every flag the chart renders is listed here.
*/}}
{{- define "keygate.chartFlags" -}}
issuer: use the value issuerUrl instead
policy-listen: it is fixed at 0.0.0.0:8443 with token TLS (the token Service's port policy) and off without it
token-listen: it is fixed at 0.0.0.0:8080, the port the token Service and NetworkPolicy use (tokenService.port sets the Service's port)
token-tls: use the values tokenService.tls.enabled and certManager.enabled instead
token-cert-dir: the chart mounts the cert-manager certificate there (certManager.enabled)
token-service: the chart names its token Service, named in the token server's certificate (nameOverride, fullnameOverride)
webhook-listen: use the value webhook.port instead (the webhook Service and NetworkPolicy follow it)
admin: it is fixed at 0.0.0.0:8081, the port of the probes and metrics
watch-namespaces: use the value watchNamespaces instead (the chart's RBAC follows it)
lease-name: use the value leaderElection.leaseName instead (the chart's Role grants that Lease)
lease-duration: use the value leaderElection.leaseDuration instead
lease-renew-deadline: use the value leaderElection.renewDeadline instead
lease-retry-period: use the value leaderElection.retryPeriod instead
audit-allowed-sample: use the value audit.allowedSample instead
audit-refused-per-second: use the value audit.refusedPerSecond instead
sidecar-audit-allowed-sample: use the value sidecar.audit.allowedSample instead
sidecar-audit-refused-per-second: use the value sidecar.audit.refusedPerSecond instead
sidecar-prometheus-annotations: use the value sidecar.prometheusAnnotations instead
webhook-tls: use the value certManager.enabled instead
webhook-cert-dir: the chart mounts the cert-manager certificate there (certManager.enabled)
webhook-service: the chart names its webhook Service (nameOverride, fullnameOverride)
mutating-webhook-name: the chart names its MutatingWebhookConfiguration (webhook.mutating.enabled, fullnameOverride)
validating-webhook-name: the chart names its ValidatingWebhookConfiguration (webhook.validating.enabled, fullnameOverride)
sidecar-image: use the values sidecar.image.repository and sidecar.image.tag or sidecar.image.digest instead
sidecar-cpu-request: use the value sidecar.resources.requests.cpu instead
sidecar-memory-request: use the value sidecar.resources.requests.memory instead
sidecar-cpu-limit: use the value sidecar.resources.limits.cpu instead
sidecar-memory-limit: use the value sidecar.resources.limits.memory instead
default-capture: use the value sidecar.capture instead
concurrency: use the value concurrency instead
default-token-lifetime: use the value token.defaultLifetime instead
max-token-lifetime: use the value token.maxLifetime instead
signing-key-rotation: use the value signingKeys.rotation instead
log-format: use the value log.format instead
log: use the value log.level instead
namespace: the chart sets it through POD_NAMESPACE to the release namespace, where its RBAC grants access; install the release in the namespace you want instead
pod-name: the chart sets it through POD_NAME to each replica's Pod name, its identity in the leader Lease, which must stay unique
{{- end }}

{{/* Fails the render when extraArgs repeats a flag of keygate.chartFlags, spelled --flag=value or --flag value. */}}
{{- define "keygate.checkExtraArgs" -}}
{{- $flags := include "keygate.chartFlags" . | fromYaml }}
{{- range $arg := .Values.extraArgs }}
{{- if hasPrefix "--" $arg }}
{{- $name := (splitn "=" 2 (trimPrefix "--" $arg))._0 }}
{{- with get $flags $name }}
{{- fail (printf "extraArgs: %q: the chart already sets --%s (keygate operator takes each flag once); %s" $arg $name .) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of the startup check's Pod (startupCheck.enabled). */}}
{{- define "keygate.startupCheckSelectorLabels" -}}
app.kubernetes.io/name: {{ include "keygate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: startupcheck
{{- end }}

{{/*
Annotations of the startup check's objects (startupCheck.enabled): a post-install and
post-upgrade hook of the weight given (the ServiceAccount and its grants before the Job),
replaced on the next run and deleted once the check passes; a failed one stays to be read.
*/}}
{{- define "keygate.startupCheckHook" -}}
helm.sh/hook: post-install,post-upgrade
helm.sh/hook-weight: {{ . | quote }}
helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
{{- end }}
