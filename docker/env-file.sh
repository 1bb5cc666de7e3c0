# shellcheck shell=bash
# Sourced by the host-side scripts. env_file_value KEY: KEY's value in $ENV_FILE (default .env),
# read as data the way compose reads it; sourcing the file would run it as shell code.
env_file_value() {
    local key=$1 line value=
    [ -f "${ENV_FILE:-.env}" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line#export }
        case $line in
            "$key="*) value=${line#"$key="} ;;
        esac
    done <"${ENV_FILE:-.env}"
    case $value in
        \"*\") value=${value:1:${#value}-2} ;;
        \'*\') value=${value:1:${#value}-2} ;;
        *" #"*) value=${value%% #*} ;;
    esac
    printf '%s' "$value"
}
