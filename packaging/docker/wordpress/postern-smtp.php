<?php
/**
 * Plugin Name: postern SMTP
 * Description: Sends WordPress's mail (PHPMailer) through the postern sidecar over plain SMTP
 *              on the compose network: no SMTP plugin, no password. postern relays it to
 *              Microsoft 365 with OAuth2.
 *
 * Installed as a must-use plugin (wp-content/mu-plugins/), so it cannot be switched off by
 * accident. Settings come from the container's environment.
 */
add_action('phpmailer_init', function ($phpmailer) {
    $phpmailer->isSMTP();
    $phpmailer->Host = getenv('POSTERN_SMTP_HOST') ?: 'postern';
    $phpmailer->Port = (int) (getenv('POSTERN_SMTP_PORT') ?: 25);
    // postern accepts the compose network without AUTH; TLS would add nothing on a private
    // Docker network, and PHPMailer must not try STARTTLS on its own.
    $phpmailer->SMTPAuth = false;
    $phpmailer->SMTPAutoTLS = false;
    $phpmailer->SMTPSecure = '';
});
