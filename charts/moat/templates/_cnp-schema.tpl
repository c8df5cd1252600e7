{{/* Pieces of the ClusterNetworkPolicy schema used more than once. Written from Moat's own
types (policy/src/model/cnp_api.rs) and validation (policy/src/model/parse/cnp.rs), so the
API server refuses at admission what Moat would refuse after it; the limits are the
upstream CRD's, which Moat's validation mirrors. */}}

{{- define "moat.cnp.labelSelector" -}}
type: object
x-kubernetes-map-type: atomic
properties:
  matchLabels:
    type: object
    additionalProperties: {type: string}
  matchExpressions:
    type: array
    items:
      type: object
      required: [key, operator]
      properties:
        key: {type: string}
        operator: {type: string, enum: [In, NotIn, Exists, DoesNotExist]}
        values:
          type: array
          items: {type: string}
          x-kubernetes-list-type: atomic
      x-kubernetes-validations:
        - rule: "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0 : !has(self.values) || size(self.values) == 0"
          message: "In and NotIn need values; Exists and DoesNotExist take none"
    x-kubernetes-list-type: atomic
{{- end }}

{{- define "moat.cnp.namespacedPod" -}}
type: object
required: [namespaceSelector, podSelector]
properties:
  namespaceSelector: {{- include "moat.cnp.labelSelector" . | nindent 4 }}
  podSelector: {{- include "moat.cnp.labelSelector" . | nindent 4 }}
{{- end }}

{{- define "moat.cnp.port" -}}
type: object
required: [destinationPort]
properties:
  destinationPort:
    type: object
    minProperties: 1
    maxProperties: 1
    properties:
      number: {type: integer, format: int32, minimum: 1, maximum: 65535}
      range:
        type: object
        required: [start, end]
        properties:
          start: {type: integer, format: int32, minimum: 1, maximum: 65535}
          end: {type: integer, format: int32, minimum: 1, maximum: 65535}
        x-kubernetes-validations:
          - rule: "self.start < self.end"
            message: "range.start must be less than range.end"
{{- end }}

{{- define "moat.cnp.protocols" -}}
type: array
minItems: 1
maxItems: 25
items:
  type: object
  minProperties: 1
  maxProperties: 1
  properties:
    tcp: {{- include "moat.cnp.port" . | nindent 6 }}
    udp: {{- include "moat.cnp.port" . | nindent 6 }}
    sctp: {{- include "moat.cnp.port" . | nindent 6 }}
    destinationNamedPort:
      type: string
      maxLength: 15
      pattern: "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
{{- end }}

{{/* What both rule kinds share; `peers` is the rule's own peer field. */}}
{{- define "moat.cnp.ruleCommon" -}}
name: {type: string, maxLength: 100}
action: {type: string, enum: [Accept, Deny, Pass]}
protocols: {{- include "moat.cnp.protocols" . | nindent 2 }}
{{- end }}
