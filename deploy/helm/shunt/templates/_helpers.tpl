{{/* Name of the chart's objects: the release name when it contains the
     chart name, else <release>-<chart>; fullnameOverride wins. */}}
{{- define "shunt.fullname" -}}
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

{{- define "shunt.labels" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "shunt.selector" -}}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "shunt.image" -}}
{{ .Values.image.repository }}:{{ default .Chart.AppVersion .Values.image.tag }}
{{- end -}}

{{- define "shunt.seedSecret" -}}
{{ include "shunt.fullname" . }}-maglev-seed
{{- end -}}

{{/* The agent's configuration file: config from values, plus what the chart
     decides (paths inside the pod, the Kubernetes and XDP sections). */}}
{{- define "shunt.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $_ := set $cfg "apiSocket" "/run/shunt/shuntd.sock" -}}
{{- $_ := set $cfg "stateFile" "/var/lib/shunt/state.json" -}}
{{- $_ := set $cfg "metricsAddr" (printf "%s:%d" (.Values.metrics.address | toString) (int .Values.metrics.port)) -}}
{{- $xds := default dict $cfg.xds -}}
{{- $_ := set $xds "unixSocket" "/run/shunt/xds.sock" -}}
{{- $_ := set $cfg "xds" $xds -}}
{{- if .Values.kubernetes.enabled -}}
{{- $k := dict "podSocketLB" .Values.kubernetes.podSocketLB "coalesce" .Values.kubernetes.coalesce -}}
{{- with .Values.kubernetes.nodeAddresses }}{{ $_ := set $k "nodeAddresses" . }}{{ end -}}
{{- with .Values.kubernetes.cgroupRoots }}{{ $_ := set $k "cgroupRoots" . }}{{ end -}}
{{- $_ := set $cfg "kubernetes" $k -}}
{{- end -}}
{{- if or .Values.xdp.devices .Values.xdp.dsrDevices -}}
{{- $x := dict "devices" .Values.xdp.devices "dsrDevices" .Values.xdp.dsrDevices "mode" .Values.xdp.mode "tableSize" (int .Values.xdp.tableSize) "snatPorts" .Values.xdp.snatPorts "conntrack" .Values.xdp.conntrack "maxServices" (int .Values.xdp.maxServices) "maxBackends" (int .Values.xdp.maxBackends) "maxFlows" (int .Values.xdp.maxFlows) -}}
{{- with .Values.xdp.nodeAddr }}{{ $_ := set $x "nodeAddr" . }}{{ end -}}
{{- with .Values.xdp.nodeAddr6 }}{{ $_ := set $x "nodeAddr6" . }}{{ end -}}
{{- $_ := set $cfg "xdp" $x -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}
