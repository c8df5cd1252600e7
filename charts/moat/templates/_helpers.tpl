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

{{/* Where enforcers reach this release's server by default: the Service's ClusterIP, which
kubelet puts in MOAT_SERVER_SERVICE_HOST and expands in args. No DNS: cluster DNS runs in
pods, whose traffic a fail-closed dataplane may deny until the node has its snapshot. */}}
{{- define "moat.serverAddress" -}}
{{- .Values.enforcer.serverAddress | default (printf "https://$(MOAT_SERVER_SERVICE_HOST):%v" .Values.server.service.syncPort) -}}
{{- end }}

{{- define "moat.bootstrapAddress" -}}
{{- .Values.enforcer.bootstrapAddress | default (printf "https://$(MOAT_SERVER_SERVICE_HOST):%v" .Values.server.service.bootstrapPort) -}}
{{- end }}

{{/* The ports the server listens on in the node's network namespace (hostNetwork). */}}
{{- define "moat.serverPorts" -}}
7443,7444,7445,7450
{{- end }}

{{/* The kinds the policy model reads, TokenReviews for bootstrap, and with
clusterNetworkPolicy.writeStatus the status subresource of ClusterNetworkPolicies (Moat's
only write to a policy object). */}}
{{- define "moat.watchRules" -}}
- apiGroups: [""]
  resources: [namespaces, nodes, pods]
  verbs: [list, watch]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, watch]
- apiGroups: [policy.networking.k8s.io]
  resources: [clusternetworkpolicies]
  verbs: [list, watch]
{{- if .Values.clusterNetworkPolicy.writeStatus }}
- apiGroups: [policy.networking.k8s.io]
  resources: [clusternetworkpolicies/status]
  verbs: [patch]
{{- end }}
- apiGroups: [authentication.k8s.io]
  resources: [tokenreviews]
  verbs: [create]
{{- end }}

{{/* Server replicas: the value, or 3 when the cluster has that many nodes (see values). */}}
{{- define "moat.serverReplicas" -}}
{{- if gt (int .Values.server.replicas) 0 -}}
{{- .Values.server.replicas -}}
{{- else if not .Values.server.watchLocalCluster -}}
1
{{- else -}}
{{- $nodes := lookup "v1" "Node" "" "" -}}
{{- $n := len (dig "items" list $nodes) -}}
{{- if eq $n 0 -}}3{{- else -}}{{ min 3 $n }}{{- end -}}
{{- end -}}
{{- end }}

{{/* The headless Service naming every ready replica, for enforcers to spread over. */}}
{{- define "moat.replicasAddress" -}}
{{- printf "https://moat-server-replicas.%s.svc:%v" .Release.Namespace .Values.server.service.syncPort -}}
{{- end }}
