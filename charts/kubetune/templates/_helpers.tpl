{{/*
Naming and labels shared by every template.
*/}}

{{/* Chart name, overridable with nameOverride (63 characters max, DNS-1123). */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name used as the prefix of every object: fullnameOverride, else <release>-<name>, or the
release name alone when it already contains the chart name.
*/}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Namespace of the chart's namespaced objects. */}}
{{- define "kubetune.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{/* chart label value: <name>-<version>. */}}
{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select the operator pods (stable across upgrades). */}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* Standard labels for every object. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Name of the ServiceAccount the operator runs as. */}}
{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Operator image reference: repository@digest or repository:tag (tag defaults to appVersion). */}}
{{- define "kubetune.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Default trainer image: repository@digest or repository:tag (tag defaults to appVersion). */}}
{{- define "kubetune.trainerImage" -}}
{{- with .Values.trainer.image -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository (.tag | default $.Chart.AppVersion) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The names of a list of LocalObjectReferences ([{name: a}, {name: b}]) as a,b. */}}
{{- define "kubetune.secretNames" -}}
{{- $names := list -}}
{{- range . -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}

{{/* A string map as key=value[,key=value] (keys sorted), the operator's nodeSelector flag format. */}}
{{- define "kubetune.keyValueList" -}}
{{- $pairs := list -}}
{{- range $key, $value := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/*
Environment of the operator container that configures the trainer pods it creates (the `trainer`
values; flag names and formats: `kubetune operator --help`).
*/}}
{{- define "kubetune.trainerEnv" -}}
- name: KUBETUNE_TRAINER_IMAGE
  value: {{ include "kubetune.trainerImage" . | quote }}
- name: KUBETUNE_TRAINER_IMAGE_PULL_POLICY
  value: {{ .Values.trainer.image.pullPolicy | quote }}
{{- with .Values.trainer.imagePullSecrets }}
- name: KUBETUNE_TRAINER_IMAGE_PULL_SECRETS
  value: {{ include "kubetune.secretNames" . | quote }}
{{- end }}
{{- with .Values.trainer.tolerations }}
- name: KUBETUNE_EXTRA_TOLERATIONS
  value: {{ toJson . | quote }}
{{- end }}
{{- with .Values.trainer.gpuNodeSelector }}
- name: KUBETUNE_GPU_NODE_SELECTOR
  value: {{ include "kubetune.keyValueList" . | quote }}
{{- end }}
{{- with .Values.trainer.cpuNodeSelector }}
- name: KUBETUNE_CPU_NODE_SELECTOR
  value: {{ include "kubetune.keyValueList" . | quote }}
{{- end }}
- name: KUBETUNE_PREFLIGHT
  value: {{ .Values.trainer.preflight | toString | quote }}
{{- with .Values.trainer.cache }}
{{- if and .existingClaim .storageClass }}
{{- fail "trainer.cache: set existingClaim (a claim you created) or storageClass (the operator creates claimName), not both" }}
{{- end }}
{{- if .storageClass }}
- name: KUBETUNE_CACHE_STORAGE_CLASS
  value: {{ .storageClass | quote }}
- name: KUBETUNE_CACHE_SIZE_GIB
  value: {{ .sizeGi | toString | quote }}
- name: KUBETUNE_CACHE_ACCESS_MODES
  value: {{ join "," .accessModes | quote }}
{{- end }}
{{- if or .existingClaim .storageClass }}
- name: KUBETUNE_CACHE_CLAIM
  value: {{ .existingClaim | default .claimName | quote }}
- name: KUBETUNE_CACHE_MOUNT_PATH
  value: {{ .mountPath | quote }}
- name: KUBETUNE_CACHE_MAX_GIB
  value: {{ .maxSizeGi | toString | quote }}
- name: KUBETUNE_CACHE_LEASE_HOURS
  value: {{ .leaseHours | toString | quote }}
{{- end }}
{{- end }}
{{- with .Values.pricing }}
- name: KUBETUNE_PRICING
  value: {{ toJson . | quote }}
{{- end }}
- name: KUBETUNE_CURRENCY
  value: {{ .Values.currency | quote }}
{{- end -}}

{{/*
"true" when a PodDisruptionBudget is rendered: podDisruptionBudget.enabled true, or "auto" with
more than one replica.
*/}}
{{- define "kubetune.podDisruptionBudget" -}}
{{- $enabled := toString .Values.podDisruptionBudget.enabled -}}
{{- if or (eq $enabled "true") (and (eq $enabled "auto") (include "kubetune.highAvailability" .)) -}}
true
{{- end -}}
{{- end -}}

{{/* "true" when the operator watches the whole cluster (watchNamespaces is empty). */}}
{{- define "kubetune.clusterWide" -}}
{{- if not .Values.watchNamespaces -}}true{{- end -}}
{{- end -}}

{{/*
"true" when more than one replica runs (high availability). The replicas coordinate through the
leader-election Lease only, so this fails when operator.leaderElection is off.
*/}}
{{- define "kubetune.highAvailability" -}}
{{- if gt (int .Values.replicaCount) 1 -}}
{{- if not .Values.operator.leaderElection -}}
{{- fail (printf "replicaCount %d needs operator.leaderElection: true: the Lease is what keeps all but one replica idle (without it every replica would reconcile the same FineTuneJobs); set replicaCount: 1 or enable leader election" (int .Values.replicaCount)) -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/* Name of the metrics Service (also the `job` label a ServiceMonitor gives its targets). */}}
{{- define "kubetune.metricsServiceName" -}}
{{- printf "%s-metrics" (include "kubetune.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Command-line arguments of `kubetune operator`. */}}
{{- define "kubetune.operatorArgs" -}}
- operator
{{- if include "kubetune.clusterWide" . }}
- --all-namespaces
{{- else }}
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
{{- end }}
- --liveness-port={{ .Values.operator.livenessPort }}
- --metrics-port={{ .Values.operator.metricsPort }}
{{- if .Values.operator.leaderElection }}
- --leader-election
- --lease-name={{ include "kubetune.fullname" . }}
- --lease-namespace={{ include "kubetune.namespace" . }}
- --lease-seconds={{ .Values.operator.leaseSeconds }}
{{- else }}
- --no-leader-election
{{- end }}
{{- if .Values.operator.occupancy }}
- --occupancy
{{- else }}
- --no-occupancy
{{- end }}
- --resize-unschedulable-seconds={{ .Values.operator.resizeUnschedulableSeconds }}
{{- range .Values.operator.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/*
The operator's permissions on namespaced resources, shared by the cluster-wide ClusterRole and
the per-namespace Roles. No Secrets: trainer pods reference them by name only.
*/}}
{{- define "kubetune.namespacedRules" -}}
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Kueue's Workloads of the trainer Jobs (read only: the operator shows Kueue's verdict, never changes it)
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["list", "watch"]
{{- with .Values.trainer.cache }}
{{- if .storageClass }}
# trainer.cache.storageClass: the operator creates the cache claim where it is missing (never updates or deletes it)
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create"]
{{- else if .existingClaim }}
# trainer.cache.existingClaim: the operator reads the claim to say why a preflight waits for it
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
{{- end }}
{{- end }}
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/* Cluster-scoped reads: nodes (GPU fleet for sizing) and CRDs (kopf's resource discovery). */}}
{{- define "kubetune.clusterReadRules" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "watch"]
{{- if .Values.operator.occupancy }}
# operator.occupancy: the GPUs held by pods of every namespace, for sizing on free capacity.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
{{- end }}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- end -}}
