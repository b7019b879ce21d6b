{{/* Release-scoped base name; short enough that "<name>-worker-<rank>" stays a DNS label. */}}
{{- define "loraxpy.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 48 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "loraxpy.routerName" -}}
{{- printf "%s-router" (include "loraxpy.fullname" .) -}}
{{- end -}}

{{/* The worker StatefulSet and its headless Service share this name. */}}
{{- define "loraxpy.workerName" -}}
{{- printf "%s-worker" (include "loraxpy.fullname" .) -}}
{{- end -}}

{{/* DNS name of one worker pod through the headless Service: (dict "root" $ "rank" N). */}}
{{- define "loraxpy.workerHost" -}}
{{- $name := include "loraxpy.workerName" .root -}}
{{- printf "%s-%d.%s.%s.svc.%s" $name (int .rank) $name .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* Every worker's gRPC address in rank order: the router's --worker-addresses. */}}
{{- define "loraxpy.workerAddresses" -}}
{{- $addresses := list -}}
{{- range $rank := until (int .Values.worker.replicas) -}}
{{- $host := include "loraxpy.workerHost" (dict "root" $ "rank" $rank) -}}
{{- $addresses = append $addresses (printf "%s:%d" $host (int $.Values.worker.port)) -}}
{{- end -}}
{{- join "," $addresses -}}
{{- end -}}

{{- define "loraxpy.image" -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{/* Selector labels: (dict "root" $ "component" "router"|"worker"). */}}
{{- define "loraxpy.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "loraxpy.labels" -}}
{{ include "loraxpy.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{/* One env entry read from an existing Secret, if one is named: (dict "env" NAME "ref" .Values.secrets.X). */}}
{{- define "loraxpy.secretEnv" -}}
{{- if .ref.name -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .ref.name }}
      key: {{ .ref.key }}
{{- end }}
{{- end -}}

{{/* Where the workers keep the hub cache (HF_HUB_CACHE) and converted models (LORAX_CACHE). */}}
{{- define "loraxpy.hubCache" -}}
{{- printf "%s/hub" (.Values.cache.mountPath | trimSuffix "/") -}}
{{- end -}}

{{- define "loraxpy.loraxCache" -}}
{{- printf "%s/loraxpy" (.Values.cache.mountPath | trimSuffix "/") -}}
{{- end -}}

{{/* The Secret holding WORKER_SECRET: the user's, or the one worker-secret.yaml makes. */}}
{{- define "loraxpy.workerSecretName" -}}
{{- .Values.secrets.workerSecret.name | default (printf "%s-worker-secret" (include "loraxpy.fullname" .)) -}}
{{- end -}}

{{/* WORKER_SECRET from that Secret: the router sends it on every call, the workers require it. */}}
{{- define "loraxpy.workerSecretEnv" -}}
{{- $ref := dict "name" (include "loraxpy.workerSecretName" .) "key" .Values.secrets.workerSecret.key -}}
{{- include "loraxpy.secretEnv" (dict "env" "WORKER_SECRET" "ref" $ref) -}}
{{- end -}}

{{/* Where the workerTls Secret is mounted in the router and the workers. */}}
{{- define "loraxpy.tlsPath" -}}
/etc/loraxpy/worker-tls
{{- end -}}

{{/* The read-only root's writable scratch: /tmp in every container, HOME inside it. */}}
{{- define "loraxpy.tmpEnv" -}}
- name: HOME
  value: /tmp
{{- end -}}

{{- define "loraxpy.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "loraxpy.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmp.sizeLimit }}
{{- end -}}
