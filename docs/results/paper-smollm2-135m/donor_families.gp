# gnuplot script written by edgepatch report SWEEP; `gnuplot donor_families.gp` redraws donor_families.png and .pdf
if (!exists("png")) png = 'donor_families.png'
if (!exists("pdf")) pdf = 'donor_families.pdf'
$p0 << EOD
0 0 0.3750 "0.38"
1 0 0.0000 "0.00"
2 0 0.4167 "0.42"
0 1 0.0000 "0.00"
1 1 0.0417 "0.04"
2 1 0.5417 "0.54"
0 2 0.3750 "0.38"
1 2 0.0417 "0.04"
2 2 0.4583 "0.46"
0 3 0.3750 "0.38"
1 3 0.0000 "0.00"
2 3 0.0000 "0.00"
0 4 0.0417 "0.04"
1 4 0.0000 "0.00"
2 4 0.4167 "0.42"
0 5 0.4167 "0.42"
1 5 0.0417 "0.04"
2 5 0.4583 "0.46"
0 6 0.0000 "0.00"
1 6 0.0417 "0.04"
2 6 0.7083 "0.71"
0 7 0.0000 "0.00"
1 7 0.0000 "0.00"
2 7 0.3333 "0.33"
0 8 0.3333 "0.33"
1 8 0.0417 "0.04"
2 8 0.4583 "0.46"
EOD
$p1 << EOD
0 0 -0.0417 "-0.04"
1 0 -0.0417 "-0.04"
2 0 0.3333 "0.33"
0 1 0.0000 "0.00"
1 1 0.0417 "0.04"
2 1 0.3333 "0.33"
0 2 0.0000 "0.00"
1 2 -0.0417 "-0.04"
2 2 0.0417 "0.04"
0 3 -0.0417 "-0.04"
1 3 0.0000 "0.00"
2 3 0.0417 "0.04"
0 4 0.0000 "0.00"
1 4 0.0417 "0.04"
2 4 -0.0417 "-0.04"
0 5 -0.0417 "-0.04"
1 5 0.0000 "0.00"
2 5 -0.0417 "-0.04"
0 6 -0.0417 "-0.04"
1 6 0.0000 "0.00"
2 6 0.3333 "0.33"
0 7 -0.0417 "-0.04"
1 7 -0.0417 "-0.04"
2 7 0.0417 "0.04"
0 8 -0.0417 "-0.04"
1 8 0.0000 "0.00"
2 8 -0.0417 "-0.04"
EOD
$p2 << EOD
0 0 0.2083 "0.21"
1 0 0.0000 "0.00"
2 0 0.6667 "0.67"
0 1 0.0000 "0.00"
1 1 0.0000 "0.00"
2 1 0.7500 "0.75"
0 2 0.2500 "0.25"
1 2 0.0000 "0.00"
2 2 0.2917 "0.29"
0 3 0.2500 "0.25"
1 3 0.0000 "0.00"
2 3 -0.1250 "-0.12"
0 4 0.0000 "0.00"
1 4 0.0833 "0.08"
2 4 0.4167 "0.42"
0 5 0.2500 "0.25"
1 5 0.0000 "0.00"
2 5 0.2500 "0.25"
0 6 0.0000 "0.00"
1 6 0.0000 "0.00"
2 6 0.7917 "0.79"
0 7 0.0000 "0.00"
1 7 0.0000 "0.00"
2 7 0.3333 "0.33"
0 8 0.1667 "0.17"
1 8 0.0000 "0.00"
2 8 0.2917 "0.29"
EOD
$p3 << EOD
0 0 -0.0833 "-0.08"
1 0 -0.0417 "-0.04"
2 0 0.2500 "0.25"
0 1 0.0000 "0.00"
1 1 -0.0417 "-0.04"
2 1 0.3333 "0.33"
0 2 0.0417 "0.04"
1 2 0.0417 "0.04"
2 2 0.0417 "0.04"
0 3 0.0000 "0.00"
1 3 -0.0417 "-0.04"
2 3 -0.0417 "-0.04"
0 4 0.0000 "0.00"
1 4 -0.0417 "-0.04"
2 4 -0.1667 "-0.17"
0 5 -0.0417 "-0.04"
1 5 0.0417 "0.04"
2 5 0.0417 "0.04"
0 6 0.0000 "0.00"
1 6 0.0000 "0.00"
2 6 0.3333 "0.33"
0 7 0.0000 "0.00"
1 7 -0.0417 "-0.04"
2 7 -0.0833 "-0.08"
0 8 0.0000 "0.00"
1 8 0.0417 "0.04"
2 8 -0.0417 "-0.04"
EOD
$p4 << EOD
0 0 0.5000 "0.50"
1 0 0.0000 "0.00"
2 0 0.3750 "0.38"
0 1 0.0000 "0.00"
1 1 0.0000 "0.00"
2 1 0.4583 "0.46"
0 2 0.5833 "0.58"
1 2 0.0000 "0.00"
2 2 0.3750 "0.38"
0 3 0.5833 "0.58"
1 3 0.0000 "0.00"
2 3 0.0000 "0.00"
0 4 0.0417 "0.04"
1 4 0.0000 "0.00"
2 4 0.4167 "0.42"
0 5 0.5833 "0.58"
1 5 0.0000 "0.00"
2 5 0.4167 "0.42"
0 6 0.0000 "0.00"
1 6 0.0000 "0.00"
2 6 0.8333 "0.83"
0 7 0.0000 "0.00"
1 7 0.0000 "0.00"
2 7 0.4583 "0.46"
0 8 0.5417 "0.54"
1 8 0.0000 "0.00"
2 8 0.4583 "0.46"
EOD
$p5 << EOD
0 0 0.2083 "0.21"
1 0 0.0000 "0.00"
2 0 0.7083 "0.71"
0 1 -0.0417 "-0.04"
1 1 -0.0417 "-0.04"
2 1 0.6667 "0.67"
0 2 0.1250 "0.12"
1 2 0.0833 "0.08"
2 2 0.1667 "0.17"
0 3 0.2500 "0.25"
1 3 0.1250 "0.12"
2 3 -0.2083 "-0.21"
0 4 0.0000 "0.00"
1 4 0.0833 "0.08"
2 4 0.3750 "0.38"
0 5 0.2500 "0.25"
1 5 0.0833 "0.08"
2 5 0.2917 "0.29"
0 6 -0.0417 "-0.04"
1 6 -0.0417 "-0.04"
2 6 0.7083 "0.71"
0 7 -0.0417 "-0.04"
1 7 0.0417 "0.04"
2 7 0.0833 "0.08"
0 8 0.2083 "0.21"
1 8 0.0833 "0.08"
2 8 0.2500 "0.25"
EOD
$p6 << EOD
0 0 0.1667 "0.17"
1 0 0.0417 "0.04"
2 0 0.3750 "0.38"
0 1 0.0417 "0.04"
1 1 0.1250 "0.12"
2 1 0.3750 "0.38"
0 2 0.2083 "0.21"
1 2 0.1250 "0.12"
2 2 0.2500 "0.25"
0 3 0.2500 "0.25"
1 3 0.1667 "0.17"
2 3 -0.5417 "-0.54"
0 4 0.0417 "0.04"
1 4 0.1667 "0.17"
2 4 0.1250 "0.12"
0 5 0.1250 "0.12"
1 5 0.1250 "0.12"
2 5 0.2083 "0.21"
0 6 0.0000 "0.00"
1 6 0.0833 "0.08"
2 6 0.3750 "0.38"
0 7 0.0000 "0.00"
1 7 0.2083 "0.21"
2 7 0.0000 "0.00"
0 8 0.1667 "0.17"
1 8 0.1250 "0.12"
2 8 0.2083 "0.21"
EOD
set palette defined (0 '#2166ac', 1 '#f7f7f7', 2 '#b2182b')
set cbrange [-0.833333:0.833333]
set tics scale 0
set terminal pngcairo noenhanced size 1520,1074 font 'sans,10'
set output png
set multiplot layout 2,4 title "smollm2-135m: donor families: accuracy drop by donor kind, edge group over all layers" noenhanced
set title "copying" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel 'donor kind'
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("random_xy" 0, "random_y" 1, "random_x" 2, "other_pairs" 3, "shuffle_y" 4, "other_task_x" 5, "other_task_y" 6, "other_mapping" 7, "other_mapping_x" 8)
unset colorbox
plot $p0 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p0 using 1:2:4 with labels notitle
set title "country_capital" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4, "" 5, "" 6, "" 7, "" 8)
unset colorbox
plot $p1 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p1 using 1:2:4 with labels notitle
set title "present_past" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4, "" 5, "" 6, "" 7, "" 8)
unset colorbox
plot $p2 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p2 using 1:2:4 with labels notitle
set title "person_sport" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4, "" 5, "" 6, "" 7, "" 8)
unset colorbox
plot $p3 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p3 using 1:2:4 with labels notitle
set title "capitalization" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel 'donor kind'
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("random_xy" 0, "random_y" 1, "random_x" 2, "other_pairs" 3, "shuffle_y" 4, "other_task_x" 5, "other_task_y" 6, "other_mapping" 7, "other_mapping_x" 8)
unset colorbox
plot $p4 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p4 using 1:2:4 with labels notitle
set title "ambiguous_present_past" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4, "" 5, "" 6, "" 7, "" 8)
unset colorbox
plot $p5 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p5 using 1:2:4 with labels notitle
set title "ambiguous_present_past_2to1" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4, "" 5, "" 6, "" 7, "" 8)
set colorbox
set cblabel 'accuracy drop'
plot $p6 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p6 using 1:2:4 with labels notitle
unset multiplot
set terminal pdfcairo noenhanced size 15.20in,10.74in font 'sans,7'
set output pdf
set multiplot layout 2,4 title "smollm2-135m: donor families: accuracy drop by donor kind, edge group over all layers" noenhanced
set title "copying" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel 'donor kind'
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("random_xy" 0, "random_y" 1, "random_x" 2, "other_pairs" 3, "shuffle_y" 4, "other_task_x" 5, "other_task_y" 6, "other_mapping" 7, "other_mapping_x" 8)
unset colorbox
plot $p0 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p0 using 1:2:4 with labels notitle
set title "country_capital" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4, "" 5, "" 6, "" 7, "" 8)
unset colorbox
plot $p1 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p1 using 1:2:4 with labels notitle
set title "present_past" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4, "" 5, "" 6, "" 7, "" 8)
unset colorbox
plot $p2 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p2 using 1:2:4 with labels notitle
set title "person_sport" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4, "" 5, "" 6, "" 7, "" 8)
unset colorbox
plot $p3 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p3 using 1:2:4 with labels notitle
set title "capitalization" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel 'donor kind'
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("random_xy" 0, "random_y" 1, "random_x" 2, "other_pairs" 3, "shuffle_y" 4, "other_task_x" 5, "other_task_y" 6, "other_mapping" 7, "other_mapping_x" 8)
unset colorbox
plot $p4 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p4 using 1:2:4 with labels notitle
set title "ambiguous_present_past" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4, "" 5, "" 6, "" 7, "" 8)
unset colorbox
plot $p5 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p5 using 1:2:4 with labels notitle
set title "ambiguous_present_past_2to1" noenhanced
set xlabel 'edge group' offset 0,-0.8
set ylabel ''
set xrange [-0.5:2.5]
set yrange [8.5:-0.5]
set xtics ("x->y same" 0, "y->y earlier" 1, "y->last" 2)
set ytics ("" 0, "" 1, "" 2, "" 3, "" 4, "" 5, "" 6, "" 7, "" 8)
set colorbox
set cblabel 'accuracy drop'
plot $p6 using 1:2:(0.5):(0.5):3 with boxxyerror fs solid 1.0 noborder lc palette notitle, $p6 using 1:2:4 with labels notitle
unset multiplot
unset output
