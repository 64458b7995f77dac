{{- define "submitd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "submitd.labels" -}}
app.kubernetes.io/name: submitd
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "submitd.selector" -}}
app.kubernetes.io/name: submitd
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{/* A service's settings: the shared default block overridden by the service's own. */}}
{{- define "submitd.service" -}}
{{- $svc := mergeOverwrite (deepCopy .root.Values.default) (deepCopy .svc) -}}
{{- toYaml $svc -}}
{{- end -}}

{{- /* A service's NATS grants: its own `nats` block, else the chart's (files/nats-grants.json).
     Empty for a service that needs no NATS (it then gets no NATS user at all). */ -}}
{{- define "submitd.natsGrants" -}}
{{- $svc := include "submitd.service" (dict "root" .root "svc" (index .root.Values.services .name | default dict)) | fromYaml -}}
{{- $chart := .root.Files.Get "files/nats-grants.json" | fromJson -}}
{{- if $svc.nats -}}
{{- toYaml $svc.nats -}}
{{- else if hasKey $chart .name -}}
{{- toYaml (index $chart .name) -}}
{{- end -}}
{{- end -}}

{{- /* The enabled services that have a NATS user (a grant). */ -}}
{{- define "submitd.natsUsers" -}}
{{- $users := list -}}
{{- range $name, $raw := .Values.services -}}
{{- $svc := include "submitd.service" (dict "root" $ "svc" $raw) | fromYaml -}}
{{- if and $svc.enabled (include "submitd.natsGrants" (dict "root" $ "name" $name)) -}}
{{- $users = append $users $name -}}
{{- end -}}
{{- end -}}
{{- toJson $users -}}
{{- end -}}

{{- /* Every NATS user: the services' (natsUsers), and the operator's tools in the chart's grants
     that are no service (submitctl, for app passwords). */ -}}
{{- define "submitd.natsLogins" -}}
{{- $users := include "submitd.natsUsers" . | fromJsonArray -}}
{{- range $name, $_ := .Files.Get "files/nats-grants.json" | fromJson -}}
{{- if not (hasKey $.Values.services $name) -}}
{{- $users = append $users $name -}}
{{- end -}}
{{- end -}}
{{- toJson $users -}}
{{- end -}}

{{- /* A Kubernetes quantity ("20Gi", "1.5Gi", "500M", "1073741824", or a number) in bytes. */ -}}
{{- define "submitd.bytes" -}}
{{- if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- int64 . -}}
{{- else -}}
{{- $q := toString . -}}
{{- if not (regexMatch "^[0-9]+([.][0-9]+)?[A-Za-z]*$" $q) -}}{{- fail (printf "cannot read the quantity %q" $q) -}}{{- end -}}
{{- $n := regexFind "^[0-9.]+" $q -}}
{{- $unit := regexFind "[A-Za-z]+$" $q -}}
{{- $scale := dict "" 1 "k" 1000 "K" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 -}}
{{- if not (hasKey $scale $unit) -}}{{- fail (printf "cannot read the quantity %q" $q) -}}{{- end -}}
{{- if contains "." $n -}}
{{- mulf (float64 $n) (index $scale $unit) | floor | int64 -}}
{{- else -}}
{{- mul (int64 $n) (index $scale $unit) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- /* GOMEMLIMIT for a container's resources: 90% of limits.memory, in whole MiB; nothing
without a limit. The Go runtime collects harder as its heap nears it instead of growing past
the limit; the other 10% is for what the runtime does not count or has not yet returned to the
kernel, and for the page cache of the container's files that the cgroup charges to the same
limit (reclaimed before an OOM kill, but not instantly). */ -}}
{{- define "submitd.goMemLimit" -}}
{{- $limit := dig "limits" "memory" "" . -}}
{{- if $limit -}}
{{- div (mul (include "submitd.bytes" $limit | int64) 9) 10485760 -}}MiB
{{- end -}}
{{- end -}}

{{- define "submitd.queueReplicas" -}}
{{- if .Values.nats.enabled -}}{{ min 3 .Values.nats.replicas }}{{- else -}}{{ .Values.externalNats.replicas }}{{- end -}}
{{- end -}}

{{- define "submitd.natsUrl" -}}
{{- if .Values.nats.enabled -}}
{{- $n := include "submitd.fullname" . -}}
nats://{{ $n }}-nats:4222
{{- else -}}
{{- required "externalNats.url is required when nats.enabled is false" .Values.externalNats.url -}}
{{- end -}}
{{- end -}}

{{- define "submitd.tlsSecret" -}}
{{- if .Values.tls.existingSecret -}}{{ .Values.tls.existingSecret }}{{- else -}}{{ include "submitd.fullname" . }}-tls{{- end -}}
{{- end -}}

{{- /* The enabled services that serve or call gRPC, each with what its certificate is for:
     {"<name>": {"server": bool, "client": bool}}. Each gets a certificate naming it. */ -}}
{{- define "submitd.grpcPeers" -}}
{{- $peers := dict -}}
{{- range $name, $raw := .Values.services -}}
{{- $svc := include "submitd.service" (dict "root" $ "svc" $raw) | fromYaml -}}
{{- if and $svc.enabled (or $svc.grpcPort $svc.calls) -}}
{{- $_ := set $peers $name (dict "server" (not (not $svc.grpcPort)) "client" (not (empty $svc.calls))) -}}
{{- end -}}
{{- end -}}
{{- toJson $peers -}}
{{- end -}}

{{- /* The name a service's gRPC certificate gives it (commonName): its Service's name. */ -}}
{{- define "submitd.grpcName" -}}
{{ include "submitd.fullname" .root }}-{{ .name }}
{{- end -}}

{{- /* Who may call service .name: every enabled service whose `calls` names it, by its
     certificate's name, as NAME:Method for each method its `callMethods` allows there (none
     listed: every method). A JSON list, the service's GRPC_ALLOWED_CALLERS. */ -}}
{{- define "submitd.grpcCallers" -}}
{{- $callers := list -}}
{{- range $other, $raw := .root.Values.services -}}
{{- $o := include "submitd.service" (dict "root" $.root "svc" $raw) | fromYaml -}}
{{- if and $o.enabled (has $.name $o.calls) -}}
{{- $cn := include "submitd.grpcName" (dict "root" $.root "name" $other) -}}
{{- $methods := get ($o.callMethods | default dict) $.name | default list -}}
{{- range $methods -}}{{- $callers = append $callers (printf "%s:%s" $cn .) -}}{{- end -}}
{{- if not $methods -}}{{- $callers = append $callers $cn -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $callers -}}
{{- end -}}

{{- define "submitd.grpcTlsSecret" -}}
{{- if .root.Values.grpcTls.existingSecretPrefix -}}{{ .root.Values.grpcTls.existingSecretPrefix }}-{{ .name }}{{- else -}}{{ include "submitd.fullname" .root }}-{{ .name }}-grpc-tls{{- end -}}
{{- end -}}

{{/* Named volumes a service can ask for in its "mounts" list: volume and mount path. */}}
{{- define "submitd.mountTable" -}}
{{- $n := include "submitd.fullname" .root -}}
{{- $tls := or .root.Values.tls.existingSecret .root.Values.certManager.enabled }}
tls: {path: /etc/submitd/tls, volume: {secret: {secretName: {{ include "submitd.tlsSecret" .root }}, optional: {{ not $tls }}}}{{ if $tls }}, env: {TLS_CERT: /etc/submitd/tls/tls.crt, TLS_KEY: /etc/submitd/tls/tls.key}{{ end }}}
{{- $grpc := .root.Values.grpcTls.enabled }}
{{- $svc := include "submitd.service" (dict "root" .root "svc" (index .root.Values.services .name)) | fromYaml }}
grpcTls: {path: /etc/submitd/grpc-tls, volume: {secret: {secretName: {{ include "submitd.grpcTlsSecret" . }}, optional: {{ not $grpc }}}}{{ if $grpc }}, env: {GRPC_TLS_CERT: /etc/submitd/grpc-tls/tls.crt, GRPC_TLS_KEY: /etc/submitd/grpc-tls/tls.key, GRPC_TLS_CA: /etc/submitd/grpc-tls/ca.crt{{ if $svc.grpcPort }}, GRPC_ALLOWED_CALLERS: {{ include "submitd.grpcCallers" . | toJson }}{{ end }}}{{ end }}}
users: {path: /etc/submitd/users, volume: {secret: {secretName: {{ .root.Values.users.existingSecret | default (printf "%s-users" $n) }}}}}
dkim: {path: /etc/submitd/dkim, volume: {secret: {secretName: {{ .root.Values.dkim.existingSecret | default (printf "%s-dkim" $n) }}}}, env: {DKIM_KEYS_FILE: /etc/submitd/dkim/keys.yaml}}
rewriteRules: {path: /etc/submitd/rewrite, volume: {configMap: {name: {{ $n }}-rewrite-rules}}}
adminToken: {path: /etc/submitd/admin, volume: {secret: {secretName: {{ .root.Values.admin.existingSecret | default (printf "%s-admin" $n) }}}}}
identity: {path: /etc/submitd/identity, volume: {{ include "submitd.identityVolume" .root }}}
config: {path: /etc/submitd/config, volume: {configMap: {name: {{ $n }}-config}}, env: {CONFIG_FILE: /etc/submitd/config/{{ .name }}.yaml}}
{{- end -}}

{{- define "submitd.image" -}}
{{ .root.Values.image.repository }}-{{ .name }}:{{ .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end -}}

{{- /* frontendService.proxyTrustedNetworks as JSON (the frontend's PROXY_TRUSTED_NETWORKS);
     required with proxyProtocol. */ -}}
{{- define "submitd.proxyTrustedNetworks" -}}
{{- if and .Values.frontendService.proxyProtocol (not .Values.frontendService.proxyTrustedNetworks) -}}
{{- fail "frontendService.proxyTrustedNetworks is required with frontendService.proxyProtocol: the CIDRs the load balancer connects from (only their PROXY header is believed; only they may reach 587 and 465)" -}}
{{- end -}}
{{- toJson (.Values.frontendService.proxyTrustedNetworks | default list) -}}
{{- end -}}

{{- /* Where helm test reaches the frontend from inside the cluster: the public Service's 587,
     or behind a PROXY balancer (whose ports take no one else) the internal port. */ -}}
{{- define "submitd.testSubmissionServer" -}}
{{- if .Values.frontendService.proxyProtocol -}}
{{ include "submitd.fullname" . }}-frontend-internal:1588
{{- else -}}
{{ include "submitd.fullname" . }}-frontend:587
{{- end -}}
{{- end -}}


{{- /* The Secrets identity names (bind password, SQL password, client secret, CAs), as one
     projected volume under /etc/submitd/identity: name -> (secret, file). */ -}}
{{- define "submitd.identitySecrets" -}}
{{- $i := .Values.identity -}}
{{- $out := dict -}}
{{- range $file, $ref := dict "ldap-bind-password" $i.ldap.bindPasswordSecret "ldap-ca.crt" $i.ldap.caSecret "sql-password" $i.sql.passwordSecret "sql-ca.crt" $i.sql.caSecret "oauth-client-secret" $i.oauth.clientSecret "oauth-ca.crt" $i.oauth.caSecret -}}
{{- if $ref.name -}}{{- $_ := set $out $file $ref -}}{{- end -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "submitd.identityVolume" -}}
{{- $secrets := include "submitd.identitySecrets" . | fromJson -}}
{{- if $secrets -}}
{projected: {sources: [{{- range $i, $file := keys $secrets | sortAlpha }}{{ if $i }}, {{ end }}{secret: {name: {{ (get $secrets $file).name }}, items: [{key: {{ (get $secrets $file).key }}, path: {{ $file }}}]}}{{ end }}]}}
{{- else -}}
{emptyDir: {}}
{{- end -}}
{{- end -}}

{{- /* Policy's identity settings (SUBMITD_POLICY_*) from .Values.identity: only those set. */ -}}
{{- define "submitd.identityEnv" -}}
{{- $i := .Values.identity -}}
{{- $secrets := include "submitd.identitySecrets" . | fromJson -}}
{{- $env := dict "DIRECTORIES" (toJson $i.directories) "DIRECTORY_CACHE_SECONDS" $i.cacheSeconds "DIRECTORY_GRACE_SECONDS" $i.graceSeconds "DIRECTORY_TIMEOUT" $i.timeoutSeconds "AUTH_MECHANISMS" (toJson $i.mechanisms) "APP_PASSWORDS" $i.appPasswords -}}
{{- if has "ldap" $i.directories -}}
{{- if not $i.ldap.url }}{{ fail "identity.ldap.url is required when identity.directories names ldap" }}{{ end -}}
{{- range $key, $value := dict "URL" $i.ldap.url "STARTTLS" $i.ldap.startTLS "MODE" $i.ldap.mode "BIND_DN" $i.ldap.bindDN "BASE_DN" $i.ldap.baseDN "USER_FILTER" $i.ldap.userFilter "GROUP_BASE_DN" $i.ldap.groupBaseDN "GROUP_FILTER" $i.ldap.groupFilter -}}
{{- if or $value (kindIs "bool" $value) }}{{ $_ := set $env (printf "LDAP_%s" $key) $value }}{{ end -}}
{{- end -}}
{{- range $key, $value := $i.ldap.settings }}{{ $_ := set $env (printf "LDAP_%s" (upper $key)) $value }}{{ end -}}
{{- if hasKey $secrets "ldap-bind-password" }}{{ $_ := set $env "LDAP_BIND_PASSWORD_FILE" "/etc/submitd/identity/ldap-bind-password" }}{{ end -}}
{{- if hasKey $secrets "ldap-ca.crt" }}{{ $_ := set $env "LDAP_CA_FILE" "/etc/submitd/identity/ldap-ca.crt" }}{{ end -}}
{{- end -}}
{{- if has "sql" $i.directories -}}
{{- if not $i.sql.dsn }}{{ fail "identity.sql.dsn is required when identity.directories names sql" }}{{ end -}}
{{- range $key, $value := dict "DSN" $i.sql.dsn "SSLMODE" $i.sql.sslmode "USER_QUERY" $i.sql.userQuery "SEND_AS_QUERY" $i.sql.sendAsQuery "LIST_QUERY" $i.sql.listQuery -}}
{{- if $value }}{{ $_ := set $env (printf "SQL_%s" $key) $value }}{{ end -}}
{{- end -}}
{{- range $key, $value := $i.sql.settings }}{{ $_ := set $env (printf "SQL_%s" (upper $key)) $value }}{{ end -}}
{{- if hasKey $secrets "sql-password" }}{{ $_ := set $env "SQL_PASSWORD_FILE" "/etc/submitd/identity/sql-password" }}{{ end -}}
{{- if hasKey $secrets "sql-ca.crt" }}{{ $_ := set $env "SQL_CA_FILE" "/etc/submitd/identity/sql-ca.crt" }}{{ end -}}
{{- end -}}
{{- if $i.oauth.mode -}}
{{- if not $i.oauth.issuer }}{{ fail "identity.oauth.issuer is required with identity.oauth.mode" }}{{ end -}}
{{- range $key, $value := dict "MODE" $i.oauth.mode "ISSUER" $i.oauth.issuer "AUDIENCE" $i.oauth.audience "LOGIN_CLAIM" $i.oauth.loginClaim "REQUIRED_SCOPE" $i.oauth.requiredScope "CLIENT_ID" $i.oauth.clientId "UNKNOWN_USERS" $i.oauth.unknownUsers -}}
{{- if $value }}{{ $_ := set $env (printf "OAUTH_%s" $key) $value }}{{ end -}}
{{- end -}}
{{- range $key, $value := $i.oauth.settings }}{{ $_ := set $env (printf "OAUTH_%s" (upper $key)) $value }}{{ end -}}
{{- if hasKey $secrets "oauth-client-secret" }}{{ $_ := set $env "OAUTH_CLIENT_SECRET_FILE" "/etc/submitd/identity/oauth-client-secret" }}{{ end -}}
{{- if hasKey $secrets "oauth-ca.crt" }}{{ $_ := set $env "OAUTH_CA_FILE" "/etc/submitd/identity/oauth-ca.crt" }}{{ end -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (not $i.egress) (or (has "ldap" $i.directories) (has "sql" $i.directories) $i.oauth.mode) -}}
{{- fail "identity.egress is required with networkPolicy.enabled and an LDAP, SQL or OAuth provider: the CIDRs and ports policy connects to (e.g. [{cidr: 10.20.0.0/16, ports: [636]}])" -}}
{{- end -}}
{{- toJson $env -}}
{{- end -}}

{{- /* A service container's environment: its settings, its NATS user's credentials (``natsUser``:
     the service's own, or "provision" for its init container), tracing. */ -}}
{{- define "submitd.containerEnv" -}}
{{- $root := .root -}}
{{- $name := .name -}}
{{- $svc := .svc -}}
{{- $mounts := .mounts -}}
{{- $user := .natsUser -}}
{{- $n := include "submitd.fullname" $root -}}
{{- $prefix := printf "SUBMITD_%s_" (upper $name) }}
{{- if include "submitd.natsGrants" (dict "root" $root "name" $name) }}
- {name: {{ $prefix }}NATS_URL, value: {{ include "submitd.natsUrl" $root | quote }}}
{{- if $root.Values.nats.enabled }}
{{- if $root.Values.nats.auth.enabled }}
- {name: {{ $prefix }}NATS_USER, value: {{ $user }}}
- name: {{ $prefix }}NATS_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ $n }}-nats-auth, key: {{ $user }}}}
- {name: {{ $prefix }}NATS_INBOX_PREFIX, value: _INBOX_{{ $user }}}
{{- end }}
{{- else if $root.Values.externalNats.existingSecret }}
- name: {{ $prefix }}NATS_USER
  valueFrom: {secretKeyRef: {name: {{ $root.Values.externalNats.existingSecret }}, key: user, optional: true}}
- name: {{ $prefix }}NATS_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ $root.Values.externalNats.existingSecret }}, key: password, optional: true}}
{{- end }}
{{- end }}
- {name: {{ $prefix }}LOG_LEVEL, value: {{ $svc.logLevel | quote }}}
- {name: {{ $prefix }}DRAIN_SECONDS, value: {{ $svc.drainSeconds | quote }}}
{{- range $key, $value := $svc.env }}
- {name: {{ $prefix }}{{ $key }}, value: {{ tpl (toString $value) $root | quote }}}
{{- end }}
{{- if has "identity" $svc.mounts }}
{{- range $key, $value := include "submitd.identityEnv" $root | fromJson }}
- {name: {{ $prefix }}{{ $key }}, value: {{ toString $value | quote }}}
{{- end }}
{{- end }}
{{- range $mount := $svc.mounts }}
{{- range $key, $value := (get (get $mounts $mount) "env" | default dict) }}
- {name: {{ $prefix }}{{ $key }}, value: {{ $value | quote }}}
{{- end }}
{{- end }}
{{- range $key, $ref := (ternary dict $svc.secretEnv (eq $user "provision")) }}
{{- $secret := tpl (toString $ref.secret) $root }}
{{- if $secret }}
- name: {{ $prefix }}{{ $key }}
  valueFrom: {secretKeyRef: {name: {{ $secret }}, key: {{ $ref.key }}}}
{{- end }}
{{- end }}
- {name: OTEL_SERVICE_NAME, value: {{ $name }}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- {name: OTEL_RESOURCE_ATTRIBUTES, value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name={{ $root.Release.Namespace }}"}
{{- $otlp := $root.Values.tracing.otlpEndpoint | default (ternary (printf "http://%s-jaeger:4317" $n) "" $root.Values.jaeger.enabled) }}
{{- if $otlp }}
- {name: OTEL_EXPORTER_OTLP_ENDPOINT, value: {{ $otlp | quote }}}
- {name: OTEL_TRACES_SAMPLER, value: {{ $root.Values.tracing.sampler | quote }}}
- {name: OTEL_TRACES_SAMPLER_ARG, value: {{ $root.Values.tracing.samplerArg | quote }}}
{{- end }}
{{- end -}}
