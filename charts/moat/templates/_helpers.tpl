{{- define "moat.labels" -}}
app.kubernetes.io/name: moat
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "moat.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "moat.enforcerServiceAccount" -}}moat-enforcer{{- end }}

{{- define "moat.serverAddress" -}}
{{- .Values.enforcer.serverAddress | default (printf "https://moat-server.%s.svc:%v" .Release.Namespace .Values.server.service.syncPort) -}}
{{- end }}

{{- define "moat.bootstrapAddress" -}}
{{- .Values.enforcer.bootstrapAddress | default (printf "https://moat-server.%s.svc:%v" .Release.Namespace .Values.server.service.bootstrapPort) -}}
{{- end }}

{{/* The four kinds the policy model reads, and TokenReviews for bootstrap. */}}
{{- define "moat.watchRules" -}}
- apiGroups: [""]
  resources: [namespaces, nodes, pods]
  verbs: [list, watch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, watch]
- apiGroups: [authentication.k8s.io]
  resources: [tokenreviews]
  verbs: [create]
{{- end }}
