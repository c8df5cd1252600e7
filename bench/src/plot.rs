//! A dependency-free SVG line chart for the growth tables.

use std::fmt::Write as _;

/// One line: a name and (x = percent of full size, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

/// Two side-by-side panels sharing the x axis (percent of full size).
pub fn growth(left: (&str, &[Series]), right: (&str, &[Series])) -> String {
    let (w, h) = (900.0, 360.0);
    let mut svg = String::new();
    writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    )
    .unwrap();
    writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#).unwrap();
    panel(&mut svg, 0.0, left.0, left.1);
    panel(&mut svg, w / 2.0, right.0, right.1);
    svg.push_str("</svg>\n");
    svg
}

fn panel(svg: &mut String, x0: f64, title: &str, series: &[Series]) {
    let (left, top, width, height) = (x0 + 60.0, 40.0, 360.0, 260.0);
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max)
        * 1.1;
    let px = |x: f64| left + x / 100.0 * width;
    let py = |y: f64| top + height - y / ymax * height;
    writeln!(
        svg,
        r#"<text x="{}" y="22" font-size="14" font-weight="bold">{title}</text>"#,
        left
    )
    .unwrap();
    writeln!(
        svg,
        r##"<path d="M{left} {top} V{} H{}" fill="none" stroke="#333"/>"##,
        top + height,
        left + width
    )
    .unwrap();
    for i in 0..=4 {
        let y = ymax * f64::from(i) / 4.0;
        writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><line x1="{left}" x2="{}" y1="{2}" y2="{2}" stroke="#eee"/>"##,
            left - 6.0,
            py(y) + 4.0,
            if ymax < 10.0 { format!("{y:.2}") } else { format!("{y:.0}") },
            left + width,
        )
        .unwrap();
    }
    for pct in [10.0, 25.0, 50.0, 75.0, 100.0] {
        writeln!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{pct}%</text>"#,
            px(pct),
            top + height + 16.0
        )
        .unwrap();
    }
    writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">size (percent of full scale)</text>"#,
        left + width / 2.0,
        top + height + 34.0
    )
    .unwrap();
    for (i, s) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        let d: Vec<String> = s
            .points
            .iter()
            .enumerate()
            .map(|(j, p)| {
                format!(
                    "{}{:.1} {:.1}",
                    if j == 0 { "M" } else { "L" },
                    px(p.0),
                    py(p.1)
                )
            })
            .collect();
        writeln!(
            svg,
            r#"<path d="{}" fill="none" stroke="{c}" stroke-width="2"/>"#,
            d.join(" ")
        )
        .unwrap();
        for p in &s.points {
            writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                px(p.0),
                py(p.1)
            )
            .unwrap();
        }
        writeln!(
            svg,
            r#"<text x="{}" y="{}" fill="{c}">{}</text>"#,
            left + 10.0,
            top + 14.0 + 16.0 * i as f64,
            s.name
        )
        .unwrap();
    }
}
