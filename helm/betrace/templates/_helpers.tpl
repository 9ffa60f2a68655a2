{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "betrace.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "betrace.fullname" -}}
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

{{/* A component's name: <fullname>-<component>, within 63 characters. */}}
{{- define "betrace.componentName" -}}
{{- $full := include "betrace.fullname" .root | trunc (int (sub 62 (len .component))) | trimSuffix "-" -}}
{{- printf "%s-%s" $full .component -}}
{{- end -}}

{{- define "betrace.rulesConfigMapName" -}}
{{- .Values.existingRulesConfigMap | default (include "betrace.componentName" (dict "root" . "component" "rules")) -}}
{{- end -}}

{{- define "betrace.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "betrace.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels ------------------------------------------------------------------------------ */}}

{{- define "betrace.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "betrace.selectorLabels" -}}
app.kubernetes.io/name: {{ include "betrace.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "betrace.labels" -}}
helm.sh/chart: {{ include "betrace.chart" . }}
{{ include "betrace.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: betrace
{{- end -}}

{{/* Labels of one component: {root, component}. */}}
{{- define "betrace.componentLabels" -}}
{{ include "betrace.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "betrace.componentSelectorLabels" -}}
{{ include "betrace.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Images ------------------------------------------------------------------------------ */}}

{{- define "betrace.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Trace store ------------------------------------------------------------------------- */}}

{{/* The --store URL, with $(BETRACE_REDIS_PASSWORD) (expanded by Kubernetes from the Secret)
     put in its user-info part when redis.existingSecret is set. */}}
{{- define "betrace.storeURL" -}}
{{- if .Values.redis.url -}}
{{- $url := .Values.redis.url -}}
{{- if .Values.redis.existingSecret -}}
{{- $parts := splitn "://" 2 $url -}}
{{- $rest := $parts._1 -}}
{{- $hostPart := index (splitList "/" $rest) 0 -}}
{{- if contains "@" $hostPart -}}
{{- $user := index (splitList "@" $hostPart) 0 -}}
{{- $url = printf "%s://%s:$(BETRACE_REDIS_PASSWORD)@%s" $parts._0 (index (splitList ":" $user) 0) (trimPrefix (printf "%s@" $user) $rest) -}}
{{- else -}}
{{- $url = printf "%s://:$(BETRACE_REDIS_PASSWORD)@%s" $parts._0 $rest -}}
{{- end -}}
{{- end -}}
{{- $url -}}
{{- else if .Values.redis.bundled.enabled -}}
{{- printf "redis://%s.%s.svc.%s:6379/0" (include "betrace.componentName" (dict "root" . "component" "redis")) .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
memory
{{- end -}}
{{- end -}}

{{/* The sidecar ------------------------------------------------------------------------- */}}

{{/* The BeTrace sidecar container (`betrace serve`): one definition, used in the collector
     pod (mode: collector) and in the webhook's sidecar template (mode: injection). */}}
{{/* Whether the sidecar's metrics port must listen on the pod IP: the kubelet's probes or
     Prometheus reach it there. Otherwise it stays on loopback. */}}
{{- define "betrace.metricsOnPodIP" -}}
{{- $s := .Values.sidecar -}}
{{- if or .Values.metrics.podMonitor.enabled $s.livenessProbe $s.readinessProbe -}}true{{- end -}}
{{- end -}}

{{- define "betrace.sidecarContainer" -}}
{{- $s := .Values.sidecar -}}
name: betrace
image: {{ include "betrace.image" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
args:
  - serve
  - --rules=/etc/betrace/rules
  - --listen=127.0.0.1:4319
  {{- if include "betrace.metricsOnPodIP" . }}
  - --metrics-listen=$(BETRACE_POD_IP):9464
  {{- else }}
  - --metrics-listen=127.0.0.1:9464
  {{- end }}
  {{- with $s.metricsToken.existingSecret }}
  - --metrics-token-file=/etc/betrace/metrics-token/{{ $s.metricsToken.key }}
  {{- end }}
  - --decision-wait={{ $s.decisionWait }}
  - --max-trace-age={{ $s.maxTraceAge }}
  - --decided-retention={{ $s.decidedRetention }}
  - --max-traces={{ int64 $s.maxTraces }}
  - --max-spans-per-trace={{ int64 $s.maxSpansPerTrace }}
  {{- /* a number from values is a float to Helm: printed as is, 16777216 is 1.6777216e+07 */}}
  - --max-trace-bytes={{ kindIs "string" $s.maxTraceBytes | ternary $s.maxTraceBytes (int64 $s.maxTraceBytes) }}
  - --max-trace-ids={{ int64 $s.maxTraceIds }}
  - --claim-lease={{ $s.claimLease }}
  - --reload-interval={{ $s.reloadInterval }}
  - --log-level={{ $s.logLevel }}
  {{- with $s.exportOtlp }}
  - --export-otlp={{ . }}
  {{- end }}
  {{- with $s.signalsOut }}
  - --signals-out={{ . }}
  {{- end }}
  {{- $db := .Values.signalsDb }}
  {{- if or $db.url $db.urlKey }}
  - --signals-retention={{ $db.retention }}
  {{- if and $db.existingSecret $db.passwordKey }}
  - --signals-db-password-file=/etc/betrace/signals-db/{{ $db.passwordKey }}
  {{- end }}
  {{- end }}
  {{- $r := .Values.routing }}
  {{- with $r.alertmanager.url }}
  - --alertmanager={{ . }}
  - --alertmanager-resolve-after={{ $r.alertmanager.resolveAfter }}
  {{- end }}
  {{- with $r.traceUrl }}
  - --trace-url={{ . }}
  {{- end }}
  {{- with $r.webhook.url }}
  - --webhook={{ . }}
  {{- if $r.webhook.existingSecret }}
  - --webhook-secret-file=/etc/betrace/webhook/{{ $r.webhook.secretKey }}
  {{- end }}
  {{- end }}
  {{- with $s.extraArgs }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
env:
  {{- if include "betrace.metricsOnPodIP" . }}
  - name: BETRACE_POD_IP
    valueFrom:
      fieldRef:
        fieldPath: status.podIP
  {{- end }}
  {{- if and .Values.redis.url .Values.redis.existingSecret }}
  - name: BETRACE_REDIS_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ .Values.redis.existingSecret }}
        key: {{ .Values.redis.passwordKey }}
  {{- end }}
  # The store URL goes in the environment, not argv: it may carry the Redis password.
  - name: BETRACE_STORE
    value: {{ include "betrace.storeURL" . | quote }}
  {{- if .Values.signalsDb.urlKey }}
  - name: BETRACE_SIGNALS_DB
    valueFrom:
      secretKeyRef:
        name: {{ required "signalsDb.urlKey needs signalsDb.existingSecret" .Values.signalsDb.existingSecret }}
        key: {{ .Values.signalsDb.urlKey }}
  {{- else if .Values.signalsDb.url }}
  - name: BETRACE_SIGNALS_DB
    value: {{ .Values.signalsDb.url | quote }}
  {{- end }}
  {{- with $s.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- if include "betrace.metricsOnPodIP" . }}
ports:
  - name: metrics
    containerPort: 9464
    protocol: TCP
{{- end }}
{{- with $s.livenessProbe }}
livenessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $s.readinessProbe }}
readinessProbe:
  {{- toYaml . | nindent 2 }}
{{- end }}
resources:
  {{- toYaml $s.resources | nindent 2 }}
securityContext:
  {{- toYaml $s.securityContext | nindent 2 }}
volumeMounts:
  - name: betrace-rules
    mountPath: /etc/betrace/rules
    readOnly: true
  {{- if $s.metricsToken.existingSecret }}
  - name: betrace-metrics-token
    mountPath: /etc/betrace/metrics-token
    readOnly: true
  {{- end }}
  {{- if and (or .Values.signalsDb.url .Values.signalsDb.urlKey) .Values.signalsDb.existingSecret .Values.signalsDb.passwordKey }}
  - name: betrace-signals-db
    mountPath: /etc/betrace/signals-db
    readOnly: true
  {{- end }}
  {{- if and .Values.routing.webhook.url .Values.routing.webhook.existingSecret }}
  - name: betrace-webhook
    mountPath: /etc/betrace/webhook
    readOnly: true
  {{- end }}
{{- end -}}

{{/* The pod volumes the sidecar container needs. */}}
{{- define "betrace.sidecarVolumes" -}}
- name: betrace-rules
  configMap:
    name: {{ include "betrace.rulesConfigMapName" . }}
{{- with .Values.sidecar.metricsToken.existingSecret }}
- name: betrace-metrics-token
  secret:
    secretName: {{ . }}
{{- end }}
{{- $db := .Values.signalsDb }}
{{- if and (or $db.url $db.urlKey) $db.existingSecret $db.passwordKey }}
- name: betrace-signals-db
  secret:
    secretName: {{ $db.existingSecret }}
    items:
      - {key: {{ $db.passwordKey }}, path: {{ $db.passwordKey }}}
{{- end }}
{{- $hook := .Values.routing.webhook }}
{{- if and $hook.url $hook.existingSecret }}
- name: betrace-webhook
  secret:
    secretName: {{ $hook.existingSecret }}
    items:
      - {key: {{ $hook.secretKey }}, path: {{ $hook.secretKey }}}
{{- end }}
{{- end -}}

{{/* Pod-level security context shared by every pod of the chart. */}}
{{- define "betrace.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Webhook ----------------------------------------------------------------------------- */}}

{{- define "betrace.webhookName" -}}
{{- include "betrace.componentName" (dict "root" . "component" "webhook") -}}
{{- end -}}

{{- define "betrace.webhookTLSSecretName" -}}
{{- include "betrace.componentName" (dict "root" . "component" "webhook-tls") -}}
{{- end -}}

{{/* DNS names the webhook's serving certificate must carry. */}}
{{- define "betrace.webhookDNSNames" -}}
{{- $svc := include "betrace.webhookName" . -}}
{{- $ns := .Release.Namespace -}}
{{- toJson (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain)) -}}
{{- end -}}
