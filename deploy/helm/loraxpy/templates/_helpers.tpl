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

{{/*
The operator's adapter policy (proto/adapter_policy.py's AdapterSettings): the same flags on the
router and on every worker, since both enforce it. (dict "root" $ "worker" bool). A value left
empty ("", [] or null) is not passed: the code's default applies. Workers get the sources the
router allows (--adapter-source unless adapters.allowedSources), as lorax-launcher pins its shards.
*/}}
{{- define "loraxpy.adapterPolicyArgs" -}}
{{- $a := .root.Values.adapters -}}
{{- $sources := $a.allowedSources | default list -}}
{{- if kindIs "string" $sources }}{{ $sources = splitList "," $sources }}{{ end -}}
{{- $sources = join "," ($sources | uniq | sortAlpha) -}}
{{- $buckets := join "," ($a.allowedS3Buckets | default list) -}}
{{- $pinned := $sources | default $a.source -}}
{{- if and (has "s3" (splitList "," $pinned)) (not $buckets) -}}
{{- fail "adapters.allowedS3Buckets: s3 adapters need the buckets they may come from (or \"*\" for every bucket the S3 credentials can read)" -}}
{{- end -}}
{{- $flags := list -}}
{{- if .worker -}}
{{- $flags = append $flags (printf "--allowed-adapter-sources=%s" $pinned) -}}
{{- else if $sources -}}
{{- $flags = append $flags (printf "--allowed-adapter-sources=%s" $sources) -}}
{{- end -}}
{{- with join "," ($a.allowedHubAdapters | default list) -}}
{{- $flags = append $flags (printf "--allowed-hub-adapters=%s" .) -}}
{{- end -}}
{{- with $buckets -}}
{{- $flags = append $flags (printf "--allowed-s3-buckets=%s" .) -}}
{{- end -}}
{{- if not (kindIs "invalid" $a.maxSizeMiB) -}}
{{- $flags = append $flags (printf "--max-adapter-size-mib=%d" (int $a.maxSizeMiB)) -}}
{{- end -}}
{{- if not (kindIs "invalid" $a.diskCacheMiB) -}}
{{- $flags = append $flags (printf "--adapter-disk-cache-mib=%d" (int $a.diskCacheMiB)) -}}
{{- end -}}
{{- if not (kindIs "invalid" $a.loadTimeoutS) -}}
{{- $flags = append $flags (printf "--adapter-load-timeout-s=%v" (float64 $a.loadTimeoutS)) -}}
{{- end -}}
{{- if not (kindIs "invalid" $a.maxConcurrentLoads) -}}
{{- $flags = append $flags (printf "--max-concurrent-adapter-loads=%d" (int $a.maxConcurrentLoads)) -}}
{{- end -}}
{{- range $flags }}
- {{ . | quote }}
{{- end -}}
{{- end -}}
