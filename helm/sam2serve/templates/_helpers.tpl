{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "sam2serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: <release>-<chart> unless the release name already contains the chart name.
Truncated to 54 characters so that "<fullname>-headless" still fits in 63.
*/}}
{{- define "sam2serve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sam2serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Standard labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/). */}}
{{- define "sam2serve.labels" -}}
helm.sh/chart: {{ include "sam2serve.chart" . }}
{{ include "sam2serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: server
app.kubernetes.io/part-of: sam2serve
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Immutable selector labels: never add to these (a Deployment's selector cannot change). */}}
{{- define "sam2serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sam2serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sam2serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sam2serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sam2serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{- define "sam2serve.initImage" -}}
{{- $image := .Values.engines.initContainer.image }}
{{- printf "%s:%s" $image.repository ($image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The engine directory the server serves: <mountPath>/<model>. */}}
{{- define "sam2serve.engineDir" -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.engines.mountPath) .Values.engines.model }}
{{- end }}

{{/* Name of the Secret holding SAM2SERVE_API_KEY ("" when there is no API key). */}}
{{- define "sam2serve.apiKeySecret" -}}
{{- if .Values.server.apiKey.existingSecret }}
{{- .Values.server.apiKey.existingSecret }}
{{- else if .Values.server.apiKey.value }}
{{- printf "%s-api-key" (include "sam2serve.fullname" .) }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding SAM2SERVE_METRICS_TOKEN ("" when metrics need no token). */}}
{{- define "sam2serve.metricsTokenSecret" -}}
{{- if .Values.metrics.token.existingSecret }}
{{- .Values.metrics.token.existingSecret }}
{{- else if .Values.metrics.token.value }}
{{- printf "%s-metrics-token" (include "sam2serve.fullname" .) }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding SAM2SERVE_REDIS_URL ("" when the queue is per pod). */}}
{{- define "sam2serve.redisSecret" -}}
{{- if .Values.server.redis.existingSecret }}
{{- .Values.server.redis.existingSecret }}
{{- else if .Values.server.redis.url }}
{{- printf "%s-redis" (include "sam2serve.fullname" .) }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: the preStop sleep, then the server's drain, then a margin. Computed here
and nowhere settable, so the kubelet can never SIGKILL a pod that is still draining.
*/}}
{{- define "sam2serve.terminationGracePeriodSeconds" -}}
{{- $drain := int .Values.server.drainSeconds }}
{{- $sleep := int .Values.preStopSleepSeconds }}
{{- $margin := int .Values.terminationGraceMarginSeconds }}
{{- if lt $margin 5 }}
{{- fail "terminationGraceMarginSeconds must be at least 5: the grace period has to outlast the drain" }}
{{- end }}
{{- add $sleep $drain $margin }}
{{- end }}

{{/* Resources with the GPU request/limit added when gpu.enabled. Argument: (dict "root" $ "resources" <map>). */}}
{{- define "sam2serve.resources" -}}
{{- $root := .root }}
{{- $res := deepCopy (.resources | default dict) }}
{{- if and .gpu $root.Values.gpu.enabled }}
{{- $count := int $root.Values.gpu.count }}
{{- $limits := get $res "limits" | default dict }}
{{- $_ := set $limits $root.Values.gpu.resourceName $count }}
{{- $_ := set $res "limits" $limits }}
{{- $requests := get $res "requests" | default dict }}
{{- $_ := set $requests $root.Values.gpu.resourceName $count }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
{{- if $res }}
{{- toYaml $res }}
{{- else -}}
{}
{{- end }}
{{- end }}

{{/* The default KEDA query: jobs waiting, summed over this release's pods. */}}
{{- define "sam2serve.kedaQuery" -}}
{{- if .Values.autoscaling.keda.query }}
{{- .Values.autoscaling.keda.query }}
{{- else }}
{{- printf "sum(sam2serve_queue_depth{namespace=%q,service=%q})" .Release.Namespace (include "sam2serve.fullname" .) }}
{{- end }}
{{- end }}

{{/* Checks across values that the JSON schema cannot express well; fails the render with a clear message. */}}
{{- define "sam2serve.validate" -}}
{{- if and (eq .Values.engines.source "pvc") (not .Values.engines.pvc.claimName) }}
{{- fail "engines.source is \"pvc\": set engines.pvc.claimName to the claim holding the exported engines" }}
{{- end }}
{{- if and (eq .Values.server.encoderPrecision "int8") (eq .Values.engines.source "export") (not .Values.engines.export.int8Encoder) }}
{{- fail "server.encoderPrecision int8 needs engines.export.int8Encoder: the init container builds the int8 encoder" }}
{{- end }}
{{- if and .Values.engines.tensorrt.enabled (not .Values.gpu.enabled) }}
{{- fail "engines.tensorrt.enabled needs gpu.enabled: TensorRT plans are built on the node's GPU" }}
{{- end }}
{{- if lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas) }}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (not (kindIs "invalid" .Values.podDisruptionBudget.minAvailable)) (not (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable)) }}
{{- fail "podDisruptionBudget: set maxUnavailable or minAvailable, not both (null the other)" }}
{{- end }}
{{- if and .Values.podDisruptionBudget.enabled (kindIs "invalid" .Values.podDisruptionBudget.minAvailable) (kindIs "invalid" .Values.podDisruptionBudget.maxUnavailable) }}
{{- fail "podDisruptionBudget: set one of maxUnavailable or minAvailable" }}
{{- end }}
{{- end }}

{{/* Environment of the init containers: a writable HOME and caches on /tmp (the root filesystem is read-only). */}}
{{- define "sam2serve.initEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
- name: ENGINE_WEIGHTS
  value: {{ .Values.engines.export.weights | quote }}
{{- end }}

{{/* Init containers mount the engine volume writable: they write engines and TensorRT plans into it. */}}
{{- define "sam2serve.initVolumeMounts" -}}
- name: engines
  mountPath: {{ .Values.engines.mountPath }}
  {{- with .Values.engines.pvc.subPath }}
  subPath: {{ . }}
  {{- end }}
- name: tmp
  mountPath: /tmp
- name: scripts
  mountPath: /scripts
  readOnly: true
{{- end }}
